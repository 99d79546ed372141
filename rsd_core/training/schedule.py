"""The learning-rate schedule of every trainer here: linear warm-up, then cosine decay to 0.

The policy and the draft start the cosine when the warm-up ends; the tokenizer fit and the
decoder refit run it over the whole fit with the warm-up ramp multiplied on (decay_from=0).
"""

import math

import torch


def learning_rate(step: int, steps: int, peak: float, warmup: int,
                  decay_from: int | None = None) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up to `peak` over `warmup`
    steps, times a cosine decay from 1 at step `decay_from` (default: `warmup`) to 0 at `steps`
    (0 after)."""
    decay_from = warmup if decay_from is None else decay_from
    rate = peak if step >= warmup else peak * (step + 1) / warmup
    progress = max(0, step - decay_from) / max(1, steps - decay_from)
    return rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int,
                  decay_from: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """`learning_rate` as a scheduler: its factor (peak 1) times the optimizer's lr, stepped
    once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, steps, 1.0, warmup, decay_from))
