"""torch CPU threads for a block: training and benchmarks on a shared machine.

Small matrices train fastest on one thread, and multi-threaded torch collapses when the cores
are shared (300 tokenizer steps on a busy 2-core machine: 12 s on 1 thread, 230 s on 2).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use `num_threads` torch CPU threads inside the block (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
