"""`rsd build-default`: build an untrained bundle of a preset, with its action tokenizer and a
distilled draft, in a staging directory swapped in at the end.

Phases: the action tokenizer (fitted on LIBERO demos or synthetic chunks), the main model (a new
random preset model, `rsd_core.bundle_build`), the draft (distilled on an observation directory
or on synthetic images). A bundle whose provenance says its weights were trained is never
replaced without --force, and a directory that is not a bundle never is.
"""

import argparse
import logging
import os
from pathlib import Path
import shutil
import tempfile
import time

from rsd_core.bundle import BUNDLE_FORMAT, MANIFEST, bundle_problems, default_bundle_dir
from rsd_core.bundle_build import PRESETS, RANDOM_WEIGHTS, build_main_bundle, make_readable
from rsd_core.checkpoint import CheckpointError, load_manifest
from rsd_core.tokenizer import ActionTokenizer
from rsd_core.training.distill import distill_draft
from rsd_core.training.draft_training import draft_summary_line
from rsd_core.training.synthetic_observations import write_synthetic_observations
from rsd_core.training.tokenizer_fit import (
    DEFAULT_STEPS,
    DEFAULT_SYNTHETIC,
    fit_tokenizer,
    load_demo_chunks,
    synthetic_chunks,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd build-default` options."""
    parser.add_argument('--out', default=None,
                        help='bundle directory (default: $RSD_MODEL_DIR, the colcon share dir, '
                             'or <repo>/models/default)')
    parser.add_argument('--if-missing', action='store_true',
                        help='do nothing when a complete bundle is already there')
    parser.add_argument('--force', action='store_true',
                        help='replace a bundle even when it holds trained weights')
    parser.add_argument('--preset', default='default', choices=sorted(PRESETS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--demos', nargs='+', default=None, metavar='HDF5',
                        help='fit the action tokenizer on LIBERO HDF5 demos instead of '
                             'synthetic chunks')
    parser.add_argument('--tokenizer-steps', type=int, default=None,
                        help='action tokenizer training steps (default: its trainer default)')
    parser.add_argument('--observations', default=None, metavar='DIR',
                        help='observation directory for the draft (default: synthetic images)')
    parser.add_argument('--draft', action=argparse.BooleanOptionalAction, default=True,
                        help='distil the default draft into <bundle>/draft')
    parser.add_argument('--draft-samples', type=int, default=512,
                        help='samples recorded from the main model for the draft')
    parser.add_argument('--draft-epochs', type=int, default=40, help='draft training epochs')


def run(args: argparse.Namespace) -> int:
    """`rsd build-default`: build the bundle in a staging directory, then swap it in; exit 1
    on failure."""
    out_dir = Path(args.out).expanduser() if args.out else default_bundle_dir()
    problems = bundle_problems(out_dir)
    if args.if_missing and not problems:
        logger.info('bundle at %s is complete; nothing to do', out_dir)
        return 0
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        logger.error('%s exists and is not a bundle; refusing to replace it', out_dir)
        return 1
    trained = trained_by(out_dir)
    if trained and not args.force:
        logger.error('%s holds trained weights (%s); refusing to replace them with an untrained '
                     'bundle (give --out elsewhere, or --force)', out_dir, trained)
        return 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.building-', dir=out_dir.parent))
    try:
        build_bundle(staging, args)
        make_readable(staging)
        replace_dir(staging, out_dir)
    except (ValueError, RuntimeError, OSError) as exc:
        logger.error('build failed: %s', exc)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info('bundle ready at %s (%.1f MB)', out_dir, dir_size(out_dir) / 1e6)
    return 0


def trained_by(bundle_dir: Path) -> str | None:
    """The provenance 'weights' entry of a bundle whose weights are not RANDOM_WEIGHTS, else
    None (also when there is no readable manifest)."""
    try:
        weights = load_manifest(bundle_dir / MANIFEST, BUNDLE_FORMAT)['provenance']['weights']
    except (CheckpointError, OSError, KeyError, TypeError):
        return None
    return None if weights == RANDOM_WEIGHTS else str(weights)


def build_bundle(bundle_dir: Path, args: argparse.Namespace) -> None:
    """The phases of `rsd build-default`: action tokenizer, main model, draft."""
    steps = 3 if args.draft else 2
    started = time.perf_counter()
    logger.info('[1/%d] action tokenizer: fitting on %s', steps,
                f'{len(args.demos)} demo file(s)' if args.demos else 'synthetic chunks')
    tokenizer = fit_action_tokenizer(args.demos, args.seed, args.tokenizer_steps)
    logger.info('[1/%d] action tokenizer done (%.1f s)', steps, time.perf_counter() - started)
    started = time.perf_counter()
    logger.info('[2/%d] main model: building preset %r (seed %d)', steps, args.preset, args.seed)
    build_main_bundle(bundle_dir, args.preset, tokenizer, seed=args.seed, provenance={
        'action_tokenizer': {'demos': [str(p) for p in args.demos]} if args.demos
        else 'synthetic chunks'})
    logger.info('[2/%d] main model done (%.1f s)', steps, time.perf_counter() - started)
    if args.draft:
        started = time.perf_counter()
        logger.info('[3/3] draft: distilling from the main model (%d samples, %d epochs)',
                    args.draft_samples, args.draft_epochs)
        build_draft(bundle_dir, args.observations, args.seed, args.draft_samples,
                    args.draft_epochs)
        logger.info('[3/3] draft done (%.1f s)', time.perf_counter() - started)


def fit_action_tokenizer(demos: list[str] | None, seed: int,
                         steps: int | None) -> ActionTokenizer:
    """The action tokenizer of a new bundle, fitted on demos or on synthetic chunks."""
    if demos:
        chunks, source = load_demo_chunks(demos), f'demos: {", ".join(demos)}'
    else:
        chunks = synthetic_chunks(DEFAULT_SYNTHETIC, seed=seed)
        source = f'synthetic: {DEFAULT_SYNTHETIC} chunks, seed {seed}'
    tokenizer, _ = fit_tokenizer(chunks, steps=DEFAULT_STEPS if steps is None else steps,
                                 seed=seed, source=source)
    return tokenizer


def build_draft(bundle_dir: Path, observations: str | None, seed: int, samples: int,
                epochs: int) -> None:
    """Distil the default draft into <bundle>/draft on observations (a directory, or None:
    synthetic images)."""
    with tempfile.TemporaryDirectory(prefix='rsd-observations-') as scratch:
        if observations is None:
            logger.info('draft: no --observations given, using synthetic images')
            observations = write_synthetic_observations(scratch, seed=seed)
        metrics = distill_draft(bundle_dir, observations, bundle_dir / 'draft',
                                samples=samples, epochs=epochs, seed=seed)
    logger.info('draft: %s', draft_summary_line(metrics))


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished bundle into place, replacing an older bundle (never other data)."""
    if out_dir.exists():
        old = out_dir.with_name(f'.{out_dir.name}.old-{os.getpid()}')
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def dir_size(directory: Path) -> int:
    """Total size in bytes of the files below `directory`."""
    return sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())


def build_untrained_bundle(out_dir: str | Path, preset: str = 'tiny', seed: int = 0,
                           tokenizer_steps: int | None = 40) -> Path:
    """A complete untrained bundle (no draft) in one call, its action tokenizer fitted for
    `tokenizer_steps` on synthetic chunks: for tools that exercise the pipeline, not a policy
    (`python -m rsd_ros.overhead --test-bundle`). out_dir must be new or empty."""
    tokenizer = fit_action_tokenizer(None, seed, tokenizer_steps)
    return build_main_bundle(out_dir, preset, tokenizer, seed=seed,
                             provenance={'action_tokenizer': 'synthetic chunks'})
