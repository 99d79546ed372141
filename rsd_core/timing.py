"""Device-synchronised phase timers.

On CUDA, work is queued asynchronously: a host clock read right after a kernel launch measures
the launch, not the kernel. `PhaseTimer` therefore records `torch.cuda.Event`s around each phase
on CUDA and synchronises once when the durations are read; on CPU it reads `time.perf_counter`.
"""

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
import time

import torch


class _HostClock:
    """Wall-clock marks for devices that run synchronously with the host (CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass


class _CudaClock:
    """CUDA events recorded on the current stream; read after a device synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates the duration of named phases, in milliseconds.

    A phase may run several times (one per decoding step); its durations add up. Phases may
    nest (a 'total' phase around the others).
    """

    def __init__(self, device: torch.device | str = 'cpu') -> None:
        device = torch.device(device)
        self.clock = _CudaClock(device) if device.type == 'cuda' else _HostClock()
        self._marks: dict[str, list[tuple]] = defaultdict(list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as one run of phase `name`."""
        start = self.clock.mark()
        try:
            yield
        finally:
            self._marks[name].append((start, self.clock.mark()))

    def elapsed_ms(self) -> dict[str, float]:
        """Total milliseconds per phase name (synchronises the device once)."""
        self.clock.synchronize()
        return {name: sum(self.clock.elapsed_ms(start, end) for start, end in marks)
                for name, marks in self._marks.items()}

    def count(self, name: str) -> int:
        """How many times phase `name` ran."""
        return len(self._marks.get(name, ()))
