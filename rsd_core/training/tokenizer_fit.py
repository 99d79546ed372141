"""`rsd train-tokenizer`: fit the RFSQ action tokenizer on action chunks and report its error.

Data: LIBERO HDF5 demonstrations (`--demos`, 8-step windows of `data/demo_i/actions`) or
synthetic OSC_POSE-like chunks (`--synthetic N`, the default bundle's data until demos exist).
Training minimises MSE + L1 between normalised chunks and their reconstruction from a random
number of residual layers (1..L, per sample), so decoding from fewer layers stays meaningful.
The reconstruction report (mean / max abs error in action units per layers kept, on a held-out
split) is stored in the tokenizer's manifest and printed.
"""

import argparse
import logging
from pathlib import Path
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from rsd_core.normalization import MODES, ActionNormalizer
from rsd_core.threads import torch_threads
from rsd_core.tokenizer import ActionTokenizer, TokenizerConfig
from rsd_core.training.demos import episode_actions, episode_chunks, find_demo_files
from rsd_core.training.schedule import warmup_cosine

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 2000
DEFAULT_SYNTHETIC = 20000


def synthetic_chunks(n: int, seed: int = 0, chunk_len: int = 8) -> np.ndarray:
    """Smooth random OSC_POSE-like delta chunks [n, chunk_len, 7] float32 in [-1, 1].

    Translation (dims 0-2): a shared random direction with a smooth speed profile (saturating
    at +-1 for fast chunks) plus a smaller smooth drift and jitter, so x/y/z are correlated.
    Rotation (3-5): small smooth deltas. Gripper (6): -1 open / +1 closed, switching once inside
    the chunk in ~15 % of the chunks.
    """
    if n < 1 or chunk_len < 2:
        raise ValueError(f'synthetic_chunks needs n >= 1 and chunk_len >= 2, got {n}, '
                         f'{chunk_len}')
    rng = np.random.default_rng(seed)
    t = np.linspace(-0.5, 0.5, chunk_len)[None, :, None]  # [1, T, 1]
    direction = rng.normal(size=(n, 1, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    slope, bend = rng.normal(0, 0.6, (n, 1, 1)), rng.normal(0, 0.5, (n, 1, 1))
    speed = rng.uniform(0, 1.4, (n, 1, 1)) * (1 + slope * t + bend * (t**2 - 1 / 12))  # [n, T, 1]
    drift = 0.15 * (rng.normal(size=(n, 1, 3)) + rng.normal(size=(n, 1, 3)) * t)
    translation = speed * direction + drift + 0.03 * rng.normal(size=(n, chunk_len, 3))
    rotation = (0.1 * (rng.normal(size=(n, 1, 3)) + rng.normal(size=(n, 1, 3)) * t)
                + 0.02 * rng.normal(size=(n, chunk_len, 3)))
    start = rng.choice([-1.0, 1.0], size=(n, 1))
    switch = np.where(rng.random(n) < 0.15, rng.integers(1, chunk_len, n), chunk_len)
    gripper = np.where(np.arange(chunk_len)[None] < switch[:, None], start, -start)  # [n, T]
    chunks = np.concatenate([translation, rotation, gripper[..., None]], axis=-1)
    return np.clip(chunks, -1.0, 1.0).astype(np.float32)


def load_demo_chunks(paths: list[str | Path], chunk_len: int = 8,
                     action_dim: int = 7) -> np.ndarray:
    """Action chunks [n, chunk_len, action_dim] float32 from LIBERO HDF5 demos.

    `paths`: HDF5 files or directories of them. Every step of every episode starts a window
    (stride 1); windows running past the episode end are padded with its last action, so an
    episode of N steps gives N chunks. Chunks keep file / demo / step order.
    """
    chunks = []
    for path in find_demo_files(paths):
        chunks += [episode_chunks(a, chunk_len) for a in episode_actions(path, action_dim)]
    result = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    logger.info('loaded %d chunks from %d episodes', len(result), len(chunks))
    return result


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + L1 on normalised chunks (MSE keeps rare large errors, e.g. gripper flips, small)."""
    error = reconstruction - target
    return error.square().mean() + error.abs().mean()


@torch.no_grad()
def reconstruction_report(tokenizer: ActionTokenizer, chunks: np.ndarray | torch.Tensor,
                          batch_size: int = 4096) -> list[dict]:
    """For layers kept 1..L: mean and max abs error in action units of decode(encode(chunks)).

    `chunks` [n, T, A] in action units. Returns [{'layers', 'mean_abs_error',
    'max_abs_error'}, ...].
    """
    chunks = torch.as_tensor(chunks)
    num_layers = tokenizer.config.num_layers
    total = torch.zeros(num_layers, dtype=torch.float64)
    worst = torch.zeros(num_layers, dtype=torch.float64)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size].to(tokenizer.device, tokenizer.dtype)
        tokens = tokenizer.encode(batch)  # [b, L, T, D]
        for layer in range(num_layers):
            error = (tokenizer.decode(tokens, layer + 1) - batch).abs().double()
            total[layer] += error.sum().cpu()
            worst[layer] = torch.maximum(worst[layer], error.max().cpu())
    count = max(chunks.numel(), 1)
    return [{'layers': layer + 1, 'mean_abs_error': float(total[layer] / count),
             'max_abs_error': float(worst[layer])} for layer in range(num_layers)]


@torch.no_grad()
def normalization_error(normalizer: ActionNormalizer, chunks: np.ndarray | torch.Tensor) -> dict:
    """Mean / max abs error (action units) of un-normalise(normalise(chunks)) alone: the floor
    that quantile clipping puts under every reconstruction."""
    reference = next(normalizer.buffers())
    chunks = torch.as_tensor(chunks).to(reference.device, reference.dtype)
    error = (normalizer.unnormalize(normalizer.normalize(chunks)) - chunks).abs()
    return {'mean_abs_error': float(error.mean()), 'max_abs_error': float(error.max())}


def format_report(report: list[dict]) -> str:
    """The reconstruction report as a text table."""
    lines = ['layers  mean_abs_error  max_abs_error   (action units)']
    lines += [f'{row["layers"]:>6}  {row["mean_abs_error"]:>14.5f}  {row["max_abs_error"]:>13.5f}'
              for row in report]
    return '\n'.join(lines)


def fit_tokenizer(chunks: np.ndarray, config: TokenizerConfig | None = None,
                  steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
                  norm: str = 'quantile', batch_size: int = 256, lr: float = 3e-3,
                  heldout_fraction: float = 0.1, device: str | torch.device = 'cpu',
                  source: str = 'unspecified',
                  num_threads: int | None = 1) -> tuple[ActionTokenizer, list[dict]]:
    """Train a tokenizer on `chunks` [n, T, A] (action units); return it and its held-out report.

    The last `heldout_fraction` of the chunks (in the given order, so stride-1 windows of one
    episode stay on one side) is held out. The normaliser is fitted on the training part.
    `num_threads`: torch CPU threads while training (restored afterwards; None keeps the current
    setting). One is fastest for these small matrices, and multi-threaded training collapses
    when the cores are shared (300 steps on a busy 2-core machine: 12 s on 1 thread, 230 s on 2).
    Deterministic for a given seed and device; the global torch RNG is left untouched.
    """
    config = config or TokenizerConfig()
    chunks = np.asarray(chunks, dtype=np.float32)
    expected = (config.chunk_len, config.action_dim)
    if chunks.ndim != 3 or chunks.shape[1:] != expected or len(chunks) < 2:
        raise ValueError(f'fit_tokenizer expects chunks [n >= 2, {expected[0]}, {expected[1]}], '
                         f'got shape {list(chunks.shape)}')
    if not np.isfinite(chunks).all():
        raise ValueError('fit_tokenizer: chunks hold NaN or Inf')
    if steps < 0 or batch_size < 1 or not 0 < heldout_fraction < 1:
        raise ValueError(f'fit_tokenizer needs steps >= 0, batch_size >= 1 and 0 < '
                         f'heldout_fraction < 1, got {steps}, {batch_size}, {heldout_fraction}')
    n_held = min(max(1, round(len(chunks) * heldout_fraction)), len(chunks) - 1)
    train, held = chunks[:-n_held], chunks[-n_held:]
    normalizer = ActionNormalizer.fit(train.reshape(-1, config.action_dim), mode=norm)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(num_threads):
        torch.manual_seed(seed)
        tokenizer = ActionTokenizer(config, normalizer).to(device)
        losses = _train(tokenizer, train, steps, seed, progress, batch_size, lr)
        seconds = time.perf_counter() - started
        report = reconstruction_report(tokenizer, held)
    tokenizer.reconstruction = report
    tokenizer.training_info = {
        'source': source, 'steps': steps, 'seed': seed, 'batch_size': batch_size, 'lr': lr,
        'norm': norm, 'train_chunks': len(train), 'heldout_chunks': len(held),
        'heldout_normalization_error': normalization_error(normalizer, held),
        'final_loss': float(np.mean(losses[-100:])) if losses else None,
        'train_seconds': round(seconds, 2),
    }
    logger.info('trained tokenizer: %d steps in %.1f s, held-out mean abs error %.5f '
                '(all layers)', steps, seconds, report[-1]['mean_abs_error'])
    return tokenizer, report


def _train(tokenizer: ActionTokenizer, train: np.ndarray, steps: int, seed: int, progress: bool,
           batch_size: int, lr: float) -> list[float]:
    """AdamW, warm-up + cosine learning rate; returns the loss of every step."""
    x = tokenizer.normalizer.normalize(torch.from_numpy(train).to(tokenizer.device))  # [N, T, A]
    generator = torch.Generator().manual_seed(seed)
    num_layers = tokenizer.config.num_layers
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr, weight_decay=0.0)
    # Linear warm-up over 5 % of the steps times a cosine decay over all of them.
    schedule = warmup_cosine(optimizer, steps, max(1, steps // 20), decay_from=0)
    losses = []
    tokenizer.train()
    bar = tqdm(range(steps), desc='train tokenizer', file=sys.stderr, disable=not progress)
    for step in bar:
        batch = x[torch.randint(len(x), (batch_size,), generator=generator).to(x.device)]
        keep = torch.randint(1, num_layers + 1, (batch_size,), generator=generator)  # [b]
        loss = reconstruction_loss(tokenizer(batch, keep.to(x.device)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f'{loss.item():.5f}')
    tokenizer.eval()
    return losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd train-tokenizer` options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--demos', nargs='+', metavar='PATH',
                        help='LIBERO HDF5 demo files, or directories of them')
    source.add_argument('--synthetic', type=int, metavar='N',
                        help='train on N synthetic OSC_POSE-like chunks')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='output directory (action_tokenizer.safetensors + .json)')
    parser.add_argument('--steps', type=int, default=DEFAULT_STEPS, help='training steps')
    parser.add_argument('--seed', type=int, default=0, help='seed for data and training')
    parser.add_argument('--norm', choices=MODES, default='quantile',
                        help='action normalisation (quantile: q01/q99 -> [-1, 1], clipped)')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--hidden-size', type=int, default=TokenizerConfig.hidden_size,
                        help='width of the encoder / decoder MLPs')


def run(args: argparse.Namespace) -> int:
    """`rsd train-tokenizer`: fit, save, print held-out reconstruction; exit 1 on bad input."""
    try:
        if args.demos:
            chunks, source = load_demo_chunks(args.demos), f'demos: {", ".join(args.demos)}'
        else:
            chunks = synthetic_chunks(args.synthetic, seed=args.seed)
            source = f'synthetic: {args.synthetic} chunks, seed {args.seed}'
        tokenizer, report = fit_tokenizer(
            chunks, TokenizerConfig(hidden_size=args.hidden_size), steps=args.steps,
            seed=args.seed, norm=args.norm, batch_size=args.batch_size, source=source)
    except ValueError as exc:
        logger.error('%s', exc)
        return 1
    weights = tokenizer.save(args.out)
    info = tokenizer.training_info
    print(f'held-out reconstruction, {info["heldout_chunks"]} chunks ({source}); '
          f'{info["steps"]} steps in {info["train_seconds"]:.1f} s')
    print(format_report(report))
    floor = info['heldout_normalization_error']
    print(f'normalisation alone ({args.norm}): mean {floor["mean_abs_error"]:.5f}, max '
          f'{floor["max_abs_error"]:.5f}')
    print(f'saved {weights}')
    return 0
