"""`rsd train-policy`: behaviour cloning of the main model on LIBERO HDF5 demonstrations.

The command line of `rsd_core.training.policy` (which documents the run and its output
directory): flags -> `TrainPolicyConfig`, the run, and its report.
"""

import argparse
import json
import logging

from rsd_core.bundle_build import PRESETS
from rsd_core.config_flags import add_dataclass_arguments, args_to_config
from rsd_core.training.draft_training import draft_summary_line as draft_summary
from rsd_core.training.policy import train_policy
from rsd_core.training.policy_config import TrainPolicyConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd train-policy` options: TrainPolicyConfig's fields, plus --preset (None until
    given, so --init can refuse it), --no-progress and --json."""
    add_dataclass_arguments(parser, TrainPolicyConfig, exclude=('preset', 'progress'))
    parser.add_argument('--preset', default=None, choices=sorted(PRESETS),
                        help='size of a new model (default: default; not with --init)')
    parser.add_argument('--no-progress', dest='progress', action='store_false',
                        help='no progress bars')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')


def config_from_args(args: argparse.Namespace) -> TrainPolicyConfig:
    """The run settings of parsed CLI arguments (ValueError for --init with --preset)."""
    if args.init and args.preset:
        raise ValueError('--preset builds a new model, --init fine-tunes an existing bundle: '
                         'give one of them')
    return args_to_config(args, TrainPolicyConfig, preset=args.preset or 'default')


def format_report(metrics: dict) -> str:
    """Final metrics as text: per-layer token accuracy, action L1, baselines, timing."""
    if metrics.get('stopped'):
        return f'stopped at step {metrics["steps"]}; continue with --resume'
    final = metrics.get('final', {})
    lines = [f'steps {metrics["steps"]}, {metrics["train_samples"]} training samples, '
             f'{metrics["held_out_samples"]} held-out; median '
             f'{metrics["seconds_per_step"] or 0:.3f} s/step']
    if final:
        lines.append('train token accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in final['train_token_accuracy']))
    held, base = final.get('held_out'), metrics.get('baselines')
    if held and base:
        lines.append('held-out token accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in held['token_accuracy']))
        lines.append('constant-guess accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in base['constant_guess_accuracy']))
        lines.append(f'held-out action L1 (greedy decoding) {held["action_l1"]:.4f}; mean-chunk '
                     f'baseline {base["mean_chunk_l1"]:.4f}; tokenizer floor '
                     f'{base["tokenizer_floor_l1"]:.4f} (action units)')
    if 'draft' in metrics:
        lines.append(f'draft: {draft_summary(metrics["draft"])}')
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    """`rsd train-policy`: train, save the bundle, print the report; exit 1 on failure."""
    try:
        metrics = train_policy(config_from_args(args))
    except (ValueError, RuntimeError, OSError) as exc:
        logger.error('%s', exc)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0
