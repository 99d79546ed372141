"""Which problem reports reach the log: each distinct one once, few per minute, bounded memory.

A hostile or broken peer can send a different malformed message 30 times a second. The node
still counts every one exactly (in /diagnostics and policy_stats); the log gets each distinct
problem once, at most `burst` new ones per `period` seconds (the rest are counted and said in
the next line that is let through), and the memory of what was logged is bounded (the oldest
keys are forgotten; keys are kept as hashes, so a 1 MB problem text costs a few bytes).
"""

from collections import OrderedDict
from collections.abc import Callable
import time


class LogLimiter:
    """admit(key) decides whether the problem `key` is logged now (see the module docstring)."""

    def __init__(self, memory: int = 256, burst: int = 10, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if memory < 1 or burst < 1 or period <= 0:
            raise ValueError('memory and burst must be >= 1 and period > 0')
        self.memory, self.burst, self.period, self.clock = memory, burst, period, clock
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._window: list[float] = []       # times of the lines let through in the period
        self.suppressed = 0                  # distinct problems not logged since the last line

    def admit(self, key: str) -> tuple[bool, int]:
        """(log it, distinct problems suppressed before it); a key already logged is never
        logged again while remembered."""
        digest = hash(key)
        if digest in self._seen:
            return False, 0
        now = self.clock()
        self._window = [t for t in self._window if now - t < self.period]
        if len(self._window) >= self.burst:
            self.suppressed += 1
            return False, 0
        self._seen[digest] = None
        while len(self._seen) > self.memory:
            self._seen.popitem(last=False)
        self._window.append(now)
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed
