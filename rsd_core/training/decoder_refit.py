"""`rsd refit-decoder`: a new tokenizer decoder whose fine layers admit a tight certificate.

The encoder, the quantiser (its layer scales) and the normaliser are kept exactly, so every
chunk encodes to the same codes as before and a policy trained on those codes stays valid;
only the decoder is refitted. The new decoder is y = W z + mlp(z_coarse): its MLP sees only the
sum of the first `coarse_layers` layers, and every later layer enters through W alone. Once at
least `coarse_layers` layers are decoded, how much the remaining layers can move an action is
then exactly gain * |W| 1 * sum of their scales (rsd_core.certificate), the same for every input.

The fit minimises the reconstruction loss of `rsd train-tokenizer` (random layers kept per
sample) plus a hinge on that certificate at `bound_depth` layers kept:

    weight * sum_i relu(gain_i |W_i| 1 r(bound_depth) - bound_target) / bound_target

which only acts on the rows of W (action values) whose worst case exceeds the target. The
reconstruction report before and after is printed and stored in the manifest.
"""

import argparse
from dataclasses import replace
import logging
from pathlib import Path
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from rsd_core.bundle import MANIFEST
from rsd_core.bundle_build import replace_action_tokenizer
from rsd_core.threads import torch_threads
from rsd_core.tokenizer import ActionTokenizer
from rsd_core.training.schedule import warmup_cosine
from rsd_core.training.tokenizer_fit import (
    format_report,
    load_demo_chunks,
    reconstruction_loss,
    reconstruction_report,
)

logger = logging.getLogger(__name__)


def linear_bound(tokenizer: ActionTokenizer, depth: int) -> torch.Tensor:
    """Per decoder output [T*A], action units: gain * |W| 1 * (sum of the scales of layers
    depth..L-1), the certificate of a coarse-layer decoder at `depth` >= coarse_layers layers
    kept. Differentiable in W."""
    gain = tokenizer.normalizer.gain().repeat(tokenizer.config.chunk_len)      # [T*A]
    radius = tokenizer.rfsq.scales()[depth:].sum().detach()
    return tokenizer.decoder.linear.weight.abs().sum(1) * gain * radius


def refit_decoder(old: ActionTokenizer, chunks: np.ndarray, coarse_layers: int = 3,
                  steps: int = 1500, seed: int = 0, lr: float = 1e-3, batch_size: int = 256,
                  bound_depth: int = 3, bound_target: float = 0.016, bound_weight: float = 0.1,
                  heldout_fraction: float = 0.1, progress: bool = True,
                  num_threads: int | None = 1) -> ActionTokenizer:
    """A copy of `old` with a refitted coarse-layer decoder (see the module docstring).

    chunks [n, T, A] action units; the last `heldout_fraction` is held out for the reports.
    The new decoder starts from the old one's weights. Deterministic for a given seed.
    """
    config = old.config
    if not 1 <= coarse_layers <= config.num_layers:
        raise ValueError(f'coarse_layers must be in 1..{config.num_layers}, got {coarse_layers}')
    if not coarse_layers <= bound_depth <= config.num_layers:
        raise ValueError(f'bound_depth must be in {coarse_layers}..{config.num_layers} '
                         f'(the certificate is linear from coarse_layers on), got {bound_depth}')
    if steps < 0 or batch_size < 1 or bound_target <= 0 or bound_weight < 0:
        raise ValueError('refit_decoder needs steps >= 0, batch_size >= 1, bound_target > 0 '
                         'and bound_weight >= 0')
    chunks = np.asarray(chunks, dtype=np.float32)
    n_held = min(max(1, round(len(chunks) * heldout_fraction)), len(chunks) - 1)
    train, held = chunks[:-n_held], chunks[-n_held:]
    new = ActionTokenizer(replace(config, coarse_layers=coarse_layers), old.normalizer)
    new.load_state_dict(old.state_dict())
    new.requires_grad_(False)
    new.decoder.requires_grad_(True)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(num_threads):
        torch.manual_seed(seed)
        losses = _fit(new, train, steps, seed, lr, batch_size, bound_depth, bound_target,
                      bound_weight, progress)
        before, after = reconstruction_report(old, held), reconstruction_report(new, held)
    new.requires_grad_(False)
    new.reconstruction = after
    new.training_info = dict(old.training_info, decoder_refit={
        'coarse_layers': coarse_layers, 'steps': steps, 'seed': seed, 'lr': lr,
        'batch_size': batch_size, 'bound_depth': bound_depth, 'bound_target': bound_target,
        'bound_weight': bound_weight, 'train_chunks': len(train), 'heldout_chunks': len(held),
        'final_loss': float(np.mean(losses[-100:])) if losses else None,
        'certified_bound_at_depth': float(linear_bound(new, bound_depth).max()),
        'reconstruction_before': before, 'train_seconds': round(time.perf_counter() - started, 2),
    })
    return new


def _fit(tokenizer: ActionTokenizer, train: np.ndarray, steps: int, seed: int, lr: float,
         batch_size: int, bound_depth: int, bound_target: float, bound_weight: float,
         progress: bool) -> list[float]:
    """AdamW on the decoder only, warm-up + cosine; returns the loss of every step."""
    x = tokenizer.normalizer.normalize(torch.from_numpy(train).to(tokenizer.device))  # [N, T, A]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(tokenizer.decoder.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, max(1, steps // 20), decay_from=0)
    losses = []
    tokenizer.train()
    bar = tqdm(range(steps), desc='refit decoder', file=sys.stderr, disable=not progress)
    for _ in bar:
        batch = x[torch.randint(len(x), (batch_size,), generator=generator).to(x.device)]
        keep = torch.randint(1, tokenizer.config.num_layers + 1, (batch_size,),
                             generator=generator).to(x.device)                   # [b]
        excess = (linear_bound(tokenizer, bound_depth) - bound_target).clamp_min(0.0)
        loss = (reconstruction_loss(tokenizer(batch, keep), batch)
                + bound_weight * excess.sum() / bound_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    tokenizer.eval()
    return losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd refit-decoder` options."""
    parser.add_argument('source', help='action tokenizer directory to start from (its encoder, '
                                       'quantiser and normaliser are kept), or a main bundle')
    parser.add_argument('--demos', nargs='+', required=True, metavar='PATH',
                        help='LIBERO HDF5 demo files or directories (actions only are read; '
                             'collect-demos --no-images is enough)')
    parser.add_argument('--out', metavar='DIR', help='output directory (default, for a bundle: '
                        "the bundle's own action tokenizer, replaced in place with its hash "
                        'recorded in the manifest)')
    parser.add_argument('--coarse-layers', type=int, default=3,
                        help='layers the decoder MLP sees (default 3)')
    parser.add_argument('--bound-depth', type=int, default=3,
                        help='layers kept at which the certificate is shaped (default 3)')
    parser.add_argument('--bound-target', type=float, default=0.016,
                        help='certified bound aimed at that depth, action units (0.016)')
    parser.add_argument('--bound-weight', type=float, default=0.1,
                        help='weight of the certificate hinge (0 = plain refit)')
    parser.add_argument('--steps', type=int, default=1500, help='training steps (1500)')
    parser.add_argument('--seed', type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """`rsd refit-decoder`: refit, save, print both reconstruction reports; exit 1 on bad input."""
    source = Path(args.source)
    is_bundle = (source / MANIFEST).is_file()
    in_place = is_bundle and args.out is None
    try:
        if not is_bundle and args.out is None:
            raise ValueError(f'{source} is a tokenizer directory, not a bundle: give --out')
        old = ActionTokenizer.load(source / 'action_tokenizer' if is_bundle else source)
        new = refit_decoder(old, load_demo_chunks(args.demos), args.coarse_layers, args.steps,
                            args.seed, bound_depth=args.bound_depth,
                            bound_target=args.bound_target, bound_weight=args.bound_weight)
        info = new.training_info['decoder_refit']
        info['demos'] = [str(path) for path in args.demos]
        if in_place:
            weights = replace_action_tokenizer(source, new, 'rsd refit-decoder')
        else:
            weights = new.save(args.out)
    except ValueError as exc:           # CheckpointError included
        logger.error('%s', exc)
        return 1
    print(f'held-out reconstruction ({info["heldout_chunks"]} chunks), before the refit:')
    print(format_report(info['reconstruction_before']))
    print(f'after (decoder MLP sees layers 0..{args.coarse_layers - 1}):')
    print(format_report(new.reconstruction))
    print(f'certified bound with {args.bound_depth} layers kept: '
          f'{info["certified_bound_at_depth"]:.5f} action units (max over values)')
    print(f'saved {weights}' + (f' into {source} (manifest updated)' if in_place else ''))
    return 0
