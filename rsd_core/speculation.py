"""How many layers the draft proposes, chosen per chunk: speculation as a bet that pays or is off.

A chunk has n layers to produce after layer 0 (L-1 in exact mode; the expected certified depth
minus one in bounded mode). A main step costs d per layer. A speculative round that starts with
s layers decided proposes k' = min(k, n - s) layers: it costs the draft D plus one verification
pass v(k') = d + k' c over k'+1 positions and yields a+1 layers (a accepted, plus the main's own
layer after them). A v1 draft runs one round, from s = 1; a rolling (v2) draft runs rounds until
no proposal fits, each from the main's truth. Expected time from s decided layers, total n + 1:

    E(s) = (n + 1 - s) d                              no round fits (or s > 1 for v1)
    E(s) = D + v(k') + sum_a P_s(a) E(s + a + 1)      P_s(a) = (1 - p_{s,a+1}) prod_{i<=a} p_{s,i}

with p_{s,i} the rate at which depth i of a round from s passes given depth i-1 passed; with
one round this is T(k) = D + v(k) + (n - 1 - E[a]) d. `SpeculationPlanner` keeps running
estimates of p_{s,i} (the last `window` tests of each, Laplace-smoothed) and of D, d and c
(exponential averages of the measured phase times), and picks the k in 0..k_max with the least
E(1), as vLLM's adaptive speculation does for text. k = 0 is main-only. Until depth 1 has been
tested the planner probes (k_max) so the first chunks measure it; while k = 0 is chosen, every
`probe_every`-th chunk probes again so speculation turns back on when acceptance rises. A depth
never reached (every proposal before it was rejected) is estimated as the depth before it, and a
round start never seen as the start before it. Thread-safe.
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
        self._tests: dict[str, dict[int, list[deque[bool]]]] = {}   # rule -> start -> depth
        self._since_probe = 0
        self._lock = threading.Lock()

    def acceptance(self, rule: str, depth: int, start: int = 1) -> float | None:
        """Estimated p of proposal `depth` (1-based) in a round of `rule` that starts with
        `start` layers decided, or None if nothing it could be estimated from was tested."""
        with self._lock:
            return self._estimate(rule, start, depth)

    def expected_ms(self, rule: str, k: int, needed: int, rolls: bool = False) -> float | None:
        """Expected time to produce `needed` layers after layer 0 with k proposals per round
        (rolls: the draft runs rounds until none fits; None while a cost or acceptance it
        needs is unmeasured)."""
        c = self.costs
        if c.step is None:
            return None
        if k == 0:
            return needed * c.step
        if c.draft is None or c.per_position is None:
            return None
        with self._lock:
            return self._expected_from(rule, k, needed + 1, 1, rolls, {})

    def choose(self, rule: str, k_max: int, needed: int, rolls: bool = False) -> int:
        """Proposals per round for this chunk, 0..min(k_max, needed - 1), for `needed` layers
        after layer 0 (a proposal past needed - 1 would verify layers that are not decoded)."""
        k_max = min(k_max, needed - 1)
        if k_max < 1:
            return 0
        times = {k: self.expected_ms(rule, k, needed, rolls) for k in range(k_max + 1)}
        if any(t is None for t in times.values()):
            return k_max                                    # unmeasured: probe
        best = min(times, key=lambda k: (times[k], k))
        with self._lock:
            self._since_probe = 0 if best else self._since_probe + 1
            if self._since_probe >= self.probe_every:
                self._since_probe = 0
                return k_max
        return best

    def record(self, rule: str | None, rounds: list[tuple[int, int]], draft_ms: float,
               verify_ms: float, steps: int, step_ms: float) -> None:
        """One chunk's outcome: its speculative rounds in order as (proposed, accepted) (none:
        main-only), the draft and verification times over all of them, and `steps` main
        steps taking `step_ms` in all."""
        with self._lock:
            c = self.costs
            if steps:
                c.step = _average(c.step, step_ms / steps)
            if not rounds or rule is None:
                return
            c.draft = _average(c.draft, draft_ms / len(rounds))
            if c.step is not None:
                positions = sum(proposed for proposed, _ in rounds)
                c.per_position = _average(
                    c.per_position, max(0.0, (verify_ms - len(rounds) * c.step) / positions))
            start = 1
            for proposed, accepted in rounds:
                for depth in range(1, min(proposed, accepted + 1) + 1):
                    self._depth_tests(rule, start, depth).append(depth <= accepted)
                start += accepted + 1

    def _expected_from(self, rule: str, k: int, total: int, start: int, rolls: bool,
                       memo: dict[int, float | None]) -> float | None:
        """E(start) of the module docstring, for `total` layers; the caller holds the lock."""
        c = self.costs
        free = total - 1 - start                            # layers a round may propose
        if free < 1 or (start > 1 and not rolls):
            return (total - start) * c.step
        if start not in memo:
            proposals = min(k, free)
            expected, reach = c.draft + c.step + proposals * c.per_position, 1.0
            for accepted in range(proposals + 1):
                p = self._estimate(rule, start, accepted + 1) if accepted < proposals else 0.0
                rest = self._expected_from(rule, k, total, start + accepted + 1, rolls, memo)
                if p is None or rest is None:
                    expected = None
                    break
                expected += reach * (1 - p) * rest
                reach *= p
            memo[start] = expected
        return memo[start]

    def _estimate(self, rule: str, start: int, depth: int) -> float | None:
        """p_{start,depth}, falling back to shallower depths, then to earlier starts."""
        per_start = self._tests.get(rule, {})
        for s in range(start, 0, -1):
            depths = per_start.get(s, [])
            for tests in reversed(depths[:depth]):
                if tests:
                    return (sum(tests) + 0.5) / (len(tests) + 1)
        return None

    def _depth_tests(self, rule: str, start: int, depth: int) -> deque[bool]:
        per_depth = self._tests.setdefault(rule, {}).setdefault(start, [])
        while len(per_depth) < depth:
            per_depth.append(deque(maxlen=self.window))
        return per_depth[depth - 1]
