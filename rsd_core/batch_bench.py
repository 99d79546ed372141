"""`rsd bench --batch N`: chunks per second and per-chunk latency when B arms share each pass.

For B = 1 and every power of two up to N, rounds interleave the batch sizes (so machine load
hits all alike): round r decodes inputs r*B .. r*B+B-1 (cyclically) in one `predict_batch`. A
chunk's latency is its batch call's (every chunk of a batch is ready when the call returns);
chunks per second = chunks / summed call time. Each row is also checked against batch 1 on
the same input (largest action difference, action units: float rounding only).
"""

import time

import numpy as np

from rsd_core.engine import RSDEngine

Input = tuple[np.ndarray, str, np.ndarray | None]  # image [S, S, 3] uint8, instruction, state


def batch_sizes(largest: int) -> list[int]:
    """1 and every power of two up to `largest`, and `largest` itself: [1, 2, 4, .., N]."""
    if largest < 1:
        raise ValueError(f'--batch must be >= 1, got {largest}')
    sizes = [1]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == largest else sizes + [largest]


def group(inputs: list[Input], start: int, size: int) -> list[Input]:
    """`size` inputs from index `start` on, wrapping around."""
    return [inputs[(start + i) % len(inputs)] for i in range(size)]


def decode_group(engine: RSDEngine, rows: list[Input]) -> tuple[np.ndarray, float]:
    """One batch: (actions [B, T, A], wall time s)."""
    images, instructions, states = zip(*rows, strict=True)
    proprios = None if states[0] is None else list(states)
    start = time.perf_counter()
    actions, _ = engine.predict_batch(list(images), list(instructions), proprios)
    return actions, time.perf_counter() - start


def batch_throughput(engine: RSDEngine, inputs: list[Input], largest: int, rounds: int,
                     warmup: int) -> dict:
    """{'<B>': {chunks_per_s, latency_p50_ms, latency_p90_ms, chunks, speedup_vs_1,
    p90_over_batch1, max_abs_diff_vs_batch1}} for every batch size (see the module docstring),
    in the engine's current decoding mode."""
    sizes = batch_sizes(largest)
    for r in range(warmup):
        for size in sizes:
            decode_group(engine, group(inputs, r * size, size))
    times = {size: [] for size in sizes}
    diffs = {size: 0.0 for size in sizes}
    single = {}                                   # input index -> batch-1 actions [T, A]
    for r in range(rounds):
        for size in sizes:
            actions, seconds = decode_group(engine, group(inputs, r * size, size))
            times[size].append(seconds)
            for row in range(size):
                index = (r * size + row) % len(inputs)
                if size == 1:
                    single[index] = actions[0]
                elif index in single:
                    diffs[size] = max(diffs[size],
                                      float(np.abs(actions[row] - single[index]).max()))
    base = {'chunks_per_s': 1 / np.mean(times[1]), 'p90': np.percentile(times[1], 90)}
    result = {}
    for size in sizes:
        seconds = np.asarray(times[size])
        rate = size * len(seconds) / seconds.sum()
        p90 = float(np.percentile(seconds, 90))
        result[str(size)] = {
            'chunks_per_s': float(rate), 'latency_p50_ms': float(np.median(seconds) * 1e3),
            'latency_p90_ms': p90 * 1e3, 'chunks': size * len(seconds),
            'speedup_vs_1': float(rate / base['chunks_per_s']),
            'p90_over_batch1': float(p90 / base['p90']),
            'max_abs_diff_vs_batch1': diffs[size]}
    return result


def batch_table(result: dict) -> str:
    """The batch section of the bench table."""
    lines = ['batch  chunks/s  p50 ms  p90 ms  x batch 1  p90 / batch 1  max |diff|']
    for size, row in result.items():
        lines.append(f'{size:>5}  {row["chunks_per_s"]:8.1f}  {row["latency_p50_ms"]:6.1f}  '
                     f'{row["latency_p90_ms"]:6.1f}  {row["speedup_vs_1"]:8.2f}x  '
                     f'{row["p90_over_batch1"]:12.2f}x  {row["max_abs_diff_vs_batch1"]:.1e}')
    return '\n'.join(lines)
