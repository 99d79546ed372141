"""`rsd train-draft`: distil the draft model from a main model on recorded observations.

1. Read an observation directory (`rsd_core.observations`) and multiply it with image
   augmentations (random resized crop with a small rotation, colour jitter, hue:
   `rsd_core.training.augmentation`).
2. Run the main model on each sample: main-only greedy decoding of layers 0..K
   (`rsd_core.engine.greedy_trace`) -> h0 and the main's own tokens for layers 1..K (exactly what
   verification compares against); for a v2 draft (`--kind v2`) every layer's codes and the
   hidden state that chose it (`rsd_core.engine.greedy_features`).
3. Train the whole draft on those tokens (`rsd_core.training.draft_training`; v2:
   `rsd_core.training.draft_v2_training`): held-out split by source image, early stopping on
   held-out loss.
4. Report per-layer token accuracy, exact-layer match and the expected accepted prefix length on
   the held-out split, next to the untrained draft and a constant 'most frequent code' guess;
   save the draft with its provenance.
"""

import argparse
from collections import defaultdict
from dataclasses import asdict, replace
import json
import logging
from pathlib import Path
import time

import numpy as np
import torch
from tqdm import tqdm

from rsd_core.bundle import default_bundle_dir
from rsd_core.config_flags import add_dataclass_arguments, args_to_config
from rsd_core.draft import MAX_PROPOSALS, DraftConfig
from rsd_core.draft_v2 import FeatureDraftConfig
from rsd_core.engine import greedy_features, greedy_trace
from rsd_core.main_model import MainModel
from rsd_core.observations import INDEX, Observation, load_image, read_observations
from rsd_core.training import augmentation
from rsd_core.training.draft_training import (
    Recording,
    TrainConfig,
    draft_summary_line,
    train_draft,
)
from rsd_core.training.draft_v2_training import FeatureRecording, train_feature_draft

logger = logging.getLogger(__name__)

KINDS = ('v1', 'v2')
# The kind `rsd train-draft` and `rsd train-policy` distil unless told: v2 agrees with the main
# more often at a fifth of v1's size (the comparison in docs/PERFORMANCE.md).
DEFAULT_KIND = 'v2'


def sample_plan(num_sources: int, samples: int, augment_images: bool) -> list[tuple[int, int]]:
    """(source index, copy number) per sample; copy 0 is the unaugmented image."""
    if not augment_images and samples > num_sources:
        logger.warning('augmentation off: %d samples requested, %d source images; using %d',
                       samples, num_sources, num_sources)
        samples = num_sources
    return [(i % num_sources, i // num_sources) for i in range(samples)]


def proprio_batch(main: MainModel, observations: list[Observation]) -> dict:
    """{'proprio': [B, P]} of the observations when `main` takes proprioception, else {}."""
    if main.proprio is None:
        return {}
    size = len(main.proprio_names)
    bad = [o.image.name for o in observations if o.proprio is None or len(o.proprio) != size]
    if bad:
        raise ValueError(f'the main model takes proprioception ({size} values: '
                         f'{", ".join(main.proprio_names)}); observations {bad[:3]} have no '
                         'matching "proprio" list')
    return {'proprio': torch.from_numpy(np.stack([o.proprio for o in observations]))}


def augmented(image: np.ndarray, seed: int, sample: int) -> np.ndarray:
    """Sample `sample`'s augmented copy of image [H, W, 3] uint8 (seeded by seed and sample)."""
    views = augmentation.augment_images(torch.from_numpy(image)[None],
                                        augmentation.seeded_generator(seed, sample),
                                        **augmentation.DISTILL_AUGMENTATION)  # [1, H, W, 3]
    return views[0].numpy()


@torch.no_grad()
def main_greedy_targets(main: MainModel, inputs: dict, num_proposals: int,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Main-only greedy decoding of layers 0..K (K = num_proposals) -> (h0 [B, H], tokens of
    layers 1..K [B, K, C], their top-1 minus top-2 logit margins [B, K, C])."""
    h0, codes, logits = greedy_trace(main, inputs, num_layers=num_proposals + 1)
    top2 = logits[:, 1:].float().topk(2, dim=-1).values  # [B, K, C, 2]
    return h0.float(), codes[:, 1:], top2[..., 0] - top2[..., 1]


@torch.no_grad()
def main_trajectories(main: MainModel, inputs: dict,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Main-only greedy decoding of every layer -> (features [B, L, H], the hidden states
    that chose each layer; codes [B, L, C]; top-1 minus top-2 logit margins [B, L, C])."""
    features, codes, logits = greedy_features(main, inputs)
    top2 = logits.float().topk(2, dim=-1).values  # [B, L, C, 2]
    return features.float(), codes, top2[..., 0] - top2[..., 1]


def record(main: MainModel, observations: list[Observation], plan: list[tuple[int, int]],
           num_proposals: int, seed: int, batch_size: int = 16,
           progress: bool = True) -> Recording:
    """The main's h0 and greedy tokens of layers 1..K on every planned sample (v1 drafts)."""
    h0, tokens, margins, source = run_main(
        main, observations, plan, seed,
        lambda inputs: main_greedy_targets(main, inputs, num_proposals), batch_size, progress)
    return Recording(h0=h0, tokens=tokens, margins=margins, source=source)


def record_trajectories(main: MainModel, observations: list[Observation],
                        plan: list[tuple[int, int]], seed: int, batch_size: int = 16,
                        progress: bool = True) -> FeatureRecording:
    """The main's greedy trajectories (features, codes of every layer) for v2 drafts."""
    features, codes, margins, source = run_main(
        main, observations, plan, seed, lambda inputs: main_trajectories(main, inputs),
        batch_size, progress)
    return FeatureRecording(features=features, codes=codes, margins=margins, source=source)


def run_main(main: MainModel, observations: list[Observation], plan: list[tuple[int, int]],
             seed: int, targets, batch_size: int = 16, progress: bool = True,
             ) -> list[torch.Tensor]:
    """targets(inputs) (tensors, batch first) on every planned (augmented) sample, batching
    equal instructions; returns them stacked in plan order, then the source indices [N]."""
    by_instruction = defaultdict(list)
    for sample, (source, _) in enumerate(plan):
        by_instruction[observations[source].instruction].append(sample)
    batches = [group[i:i + batch_size] for group in by_instruction.values()
               for i in range(0, len(group), batch_size)]
    device = main.device
    out = {}
    images_cache: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(plan), desc='recording main tokens', unit='sample', disable=not progress)
    for batch in batches:
        images = []
        for sample in batch:
            source, copy = plan[sample]
            if source not in images_cache:
                images_cache[source] = load_image(observations[source].image)
            image = images_cache[source]
            images.append(augmented(image, seed, sample) if copy else image)
        sources = [observations[plan[sample][0]] for sample in batch]
        inputs = main.processor(images, [sources[0].instruction] * len(batch))
        inputs.update(proprio_batch(main, sources))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        results = targets(inputs)
        for row, sample in enumerate(batch):
            out[sample] = [result[row].cpu() for result in results]
        bar.update(len(batch))
    bar.close()
    order = range(len(plan))
    return [torch.stack([out[i][j] for i in order]) for j in range(len(out[0]))] \
        + [torch.tensor([plan[i][0] for i in order])]


def margin_summary(margins: torch.Tensor) -> dict:
    """How decided the main's own greedy codes are (top-1 minus top-2 logit), per layer."""
    flat = margins.transpose(0, 1).flatten(1)  # [K, N*C]
    return {'median': flat.median(-1).values.tolist(),
            'fraction_below_0.1': (flat < 0.1).float().mean(-1).tolist()}


def distill_draft(main_dir: str | Path, observations_dir: str | Path, out_dir: str | Path,
                  num_proposals: int = 3, samples: int = 1024, epochs: int | None = None,
                  seed: int = 0,
                  progress: bool = True, augment_images: bool = True,
                  device: str = 'cpu', strict: bool = False,
                  train: TrainConfig | None = None, draft_sizes: dict | None = None,
                  kind: str = 'v1') -> dict:
    """Distil a draft for the main bundle at main_dir and save it to out_dir; return metrics.

    samples: number of (augmented) samples recorded, cycling over the source images (copy 0 of
    each image is unaugmented). epochs: overrides train.epochs when given. strict: refuse malformed
    observations instead of skipping them, and refuse to save a draft whose held-out loss is
    not below its untrained initialisation's. draft_sizes: DraftConfig overrides (d_model, ffn,
    n_heads, head_hidden; v2: FeatureDraftConfig's d_model, n_heads, ffn) for small test
    drafts; the default is the reference architecture. kind: 'v1' (the seed architecture, from
    h0) or 'v2' (reads the main's features, uses its head: rsd_core.draft_v2).
    """
    if kind not in KINDS:
        raise ValueError(f'draft kind must be one of {KINDS}, got {kind!r}')
    train = train or TrainConfig()
    train = train if epochs is None else replace(train, epochs=epochs)
    if not 1 <= num_proposals <= MAX_PROPOSALS:
        raise ValueError(f'num_proposals (K) must be in 1..{MAX_PROPOSALS}, got {num_proposals}')
    if samples < 2 or train.epochs < 1:
        raise ValueError(f'need samples >= 2 and epochs >= 1, got {samples} and {train.epochs}')
    started = time.perf_counter()
    observations = read_observations(observations_dir, strict=strict)
    if len(observations) < 2:
        raise ValueError(f'{Path(observations_dir) / INDEX}: {len(observations)} usable '
                         'observations; at least 2 are needed (one for training, one held out)')
    main = MainModel.from_dir(main_dir, device=device, dtype=torch.float32)
    main.eval()
    plan = sample_plan(len(observations), samples, augment_images)
    sizes = dict(num_proposals=num_proposals, codes_per_layer=main.codes_per_layer,
                 levels=main.levels, dropout=train.dropout, **(draft_sizes or {}))
    if kind == 'v2':
        recording = record_trajectories(main, observations, plan, seed, progress=progress)
        margins = recording.margins[:, 1:1 + num_proposals]           # [N, K, C]
    else:
        recording = record(main, observations, plan, num_proposals, seed, progress=progress)
        margins = recording.margins
    record_s = time.perf_counter() - started
    if kind == 'v2':
        config = FeatureDraftConfig(hidden_size=main.hidden_size, num_layers=main.num_layers,
                                    **sizes)
        model, metrics = train_feature_draft(recording, main, config, train, seed=seed,
                                             device=device, progress=progress)
    else:
        config = DraftConfig(hidden_size=main.hidden_size, **sizes)
        model, metrics = train_draft(recording, config, train, seed=seed, device=device,
                                     progress=progress)
    metrics.update(kind=kind, record_seconds=record_s,
                   train_seconds=time.perf_counter() - started - record_s,
                   main_margins=margin_summary(margins))
    if strict and not metrics['held_out']['loss'] < metrics['untrained_held_out']['loss']:
        raise RuntimeError(f'distilled draft is no better than untrained on held-out data '
                           f'(loss {metrics["held_out"]["loss"]:.4f} vs '
                           f'{metrics["untrained_held_out"]["loss"]:.4f}); not saved')
    model.cpu().float().save(out_dir, {
        'main_weights_sha256': main.weights_hash,
        'trained': True,
        'metrics': {k: v for k, v in metrics.items() if k != 'history'},
        'data': {'observations': str(Path(observations_dir).resolve()),
                 'source_images': len(observations), 'samples': len(plan),
                 'augmented': augment_images,
                 'instructions': len({o.instruction for o in observations}),
                 'suites': sorted({str(o.meta.get('suite')) for o in observations}),
                 'seed': seed},
        'training': asdict(train),
    })
    logger.info('draft saved to %s: %s', out_dir, draft_summary_line(metrics))
    return metrics


def format_report(metrics: dict) -> str:
    """A table of held-out metrics per proposal layer: trained, untrained, constant guess."""
    rows = [('trained', metrics['held_out']), ('untrained', metrics['untrained_held_out']),
            ('constant guess', metrics['constant_guess_held_out'])]
    k = len(metrics['held_out']['token_accuracy'])
    header = f'{"held-out (" + str(metrics["held_out_samples"]) + ")":<22}' + ''.join(
        f'{"layer " + str(i + 1) + " acc/exact":>22}' for i in range(k)) + f'{"mean accepted":>15}'
    lines = [header]
    for name, values in rows:
        cells = ''.join(f'{a:>13.3f} / {e:<6.3f}' for a, e in
                        zip(values['token_accuracy'], values['exact_match'], strict=True))
        lines.append(f'{name:<22}{cells}{values["mean_accepted_layers"]:>15.2f}')
    margins = metrics['main_margins']
    lines.append('main top-1 minus top-2 logit, median per layer: '
                 + ' '.join(f'{m:.3f}' for m in margins['median'])
                 + '; codes with margin < 0.1: '
                 + ' '.join(f'{f:.3f}' for f in margins['fraction_below_0.1']))
    lines.append(f'epochs {metrics["epochs_run"]} (best {metrics["best_epoch"]}), recording '
                 f'{metrics["record_seconds"]:.1f} s, training {metrics["train_seconds"]:.1f} s')
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd train-draft` options."""
    parser.add_argument('--model', default=None,
                        help='main model bundle directory (default: the default bundle)')
    parser.add_argument('--observations', required=True,
                        help='observation directory (index.jsonl + images/)')
    parser.add_argument('--out', default=None, help='draft output directory (default: '
                        '<model>/draft)')
    parser.add_argument('--kind', choices=KINDS, default=DEFAULT_KIND,
                        help="'v1': the seed architecture, from h0; 'v2': reads the main's "
                             'features and uses its head (EAGLE-style)')
    parser.add_argument('--num-proposals', type=int, default=3,
                        help='K, layers the draft proposes (1..6)')
    parser.add_argument('--samples', type=int, default=1024,
                        help='samples to record, cycling over the images with augmentation')
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                        help='augment images (random resized crop, colour jitter, rotation)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--strict', action='store_true',
                        help='stop on a malformed observation instead of skipping it, and '
                             'refuse to save a draft no better than untrained on held-out data')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')
    add_dataclass_arguments(parser.add_argument_group('training'), TrainConfig)


def run(args: argparse.Namespace) -> int:
    """`rsd train-draft`: distil and save the draft, print the report; exit 1 on failure."""
    model_dir = Path(args.model) if args.model else default_bundle_dir()
    out_dir = Path(args.out) if args.out else model_dir / 'draft'
    try:
        metrics = distill_draft(model_dir, args.observations, out_dir,
                                num_proposals=args.num_proposals, samples=args.samples,
                                seed=args.seed, augment_images=args.augment,
                                device=args.device, strict=args.strict,
                                train=args_to_config(args, TrainConfig), kind=args.kind)
    except (ValueError, RuntimeError) as exc:
        logger.error('%s', exc)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0
