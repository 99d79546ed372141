"""How many layers the draft proposes, chosen per chunk: speculation as a bet that pays or is off.

With n layers still to produce after layer 0 (L-1 in exact mode; the expected certified depth
minus one in bounded mode), a main step costs d per layer, and proposing k layers costs the
draft D plus one verification pass v(k) over k+1 positions and yields a+1 layers (a accepted,
plus the main's own layer after them). Expected time to produce the n layers:

    T(0) = n d,    T(k) = D + v(k) + (n - 1 - E[a_k]) d,    E[a_k] = sum_{j<=k} prod_{i<=j} p_i

with p_i the rate at which depth i passes given depth i-1 passed. `SpeculationPlanner` keeps
running estimates of p_i (the last `window` tests of each depth, Laplace-smoothed) and of D, d
and v (exponential averages of the measured phase times; v(k) = d + k c, c the measured cost
of each verified position beyond a step's one), and picks the k in 0..k_max with the least
expected time, as vLLM's adaptive speculation does for text. k = 0 is main-only. Until depth 1
has been tested the planner probes (k_max) so the first chunks measure it; while k = 0 is
chosen, every `probe_every`-th chunk probes again so speculation turns back on when acceptance
rises. A depth never reached (every proposal before it was rejected) is estimated as the depth
before it. Thread-safe.
"""

from collections import deque
from dataclasses import dataclass
import threading

PROBE_EVERY = 32
WINDOW = 32
SMOOTHING = 0.1     # weight of the exponential cost averages


@dataclass
class CostEstimates:
    """Running cost estimates, ms (None until measured)."""

    step: float | None = None           # d, one main step (one position)
    draft: float | None = None          # D, one draft pass
    per_position: float | None = None   # c: verifying k proposals costs v(k) = d + k c


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class SpeculationPlanner:
    """Chooses k per chunk from measured acceptance and costs (see the module docstring)."""

    def __init__(self, probe_every: int = PROBE_EVERY, window: int = WINDOW) -> None:
        if probe_every < 1 or window < 1:
            raise ValueError('probe_every and window must be >= 1')
        self.probe_every, self.window = probe_every, window
        self.costs = CostEstimates()
        self._tests: dict[str, list[deque[bool]]] = {}
        self._since_probe = 0
        self._lock = threading.Lock()

    def acceptance(self, rule: str, depth: int) -> float | None:
        """Estimated p_depth (1-based) of `rule`, or None if never tested."""
        with self._lock:
            tests = self._depth_tests(rule, depth)
            return (sum(tests) + 0.5) / (len(tests) + 1) if tests else None

    def expected_ms(self, rule: str, k: int, needed: int) -> float | None:
        """Expected time to produce `needed` layers after layer 0 with k proposals (None
        while a cost or acceptance it needs is unmeasured)."""
        c = self.costs
        if c.step is None:
            return None
        if k == 0:
            return needed * c.step
        if c.draft is None or c.per_position is None:
            return None
        expected_accepted, chain, p = 0.0, 1.0, None
        for depth in range(1, k + 1):
            p = self.acceptance(rule, depth) or p     # untested: as the depth before
            if p is None:
                return None
            chain *= p
            expected_accepted += chain
        verify = c.step + k * c.per_position
        return c.draft + verify + (needed - 1 - expected_accepted) * c.step

    def choose(self, rule: str, k_max: int, needed: int) -> int:
        """Proposals for this chunk, 0..min(k_max, needed - 1), for `needed` layers after
        layer 0 (a proposal past needed - 1 would verify layers that are not decoded)."""
        k_max = min(k_max, needed - 1)
        if k_max < 1:
            return 0
        times = {k: self.expected_ms(rule, k, needed) for k in range(k_max + 1)}
        if any(t is None for t in times.values()):
            return k_max                                    # unmeasured: probe
        best = min(times, key=lambda k: (times[k], k))
        with self._lock:
            self._since_probe = 0 if best else self._since_probe + 1
            if self._since_probe >= self.probe_every:
                self._since_probe = 0
                return k_max
        return best

    def record(self, rule: str | None, k: int, accepted: int, draft_ms: float,
               verify_ms: float, steps: int, step_ms: float) -> None:
        """One chunk's outcome: k proposed (0: none), `accepted` of them, the measured draft
        and verification times, and `steps` main steps taking `step_ms` in all."""
        with self._lock:
            c = self.costs
            if steps:
                c.step = _average(c.step, step_ms / steps)
            if k and rule is not None:
                c.draft = _average(c.draft, draft_ms)
                if c.step is not None:
                    c.per_position = _average(c.per_position,
                                              max(0.0, (verify_ms - c.step) / k))
                for depth in range(1, min(k, accepted + 1) + 1):
                    self._depth_tests(rule, depth).append(depth <= accepted)

    def _depth_tests(self, rule: str, depth: int) -> deque[bool]:
        per_depth = self._tests.setdefault(rule, [])
        while len(per_depth) < depth:
            per_depth.append(deque(maxlen=self.window))
        return per_depth[depth - 1]
