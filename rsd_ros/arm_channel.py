"""One arm served by `rsd_policy`: its topic names, its counters and its statistics.

The node serves either one arm on its own topics (parameter `arms` unset: the arm's name is '')
or several arms with one model, arm `a` on `a/camera/image_raw`, `a/instruction`,
`a/joint_states`, `a/action_chunk` and `a/policy_stats` relative to the node's namespace.
Everything an arm reports is its own: counters (frames, dropped, stale, bad input, no_state,
...), the last engine error, the latency / acceptance / batch-size window, so one arm's trouble
never shows in another arm's policy_stats or diagnostics status. Bookkeeping only, guarded by a
lock (callbacks and the inference worker update it from different threads); the node creates
the arm's publishers and subscriptions and hangs them here.
"""

from dataclasses import asdict, dataclass, replace
import threading
from typing import Any

from rsd_core.stats import ChunkStats, StatsAggregator
from rsd_ros.messages import PolicyCounters


@dataclass(frozen=True)
class ArmReport:
    """What an arm's diagnostics status is made of, taken at one instant."""

    counters: PolicyCounters     # since start
    new: PolicyCounters          # since the previous report
    error: str | None            # the last engine error, until a chunk succeeds
    summary: dict                # StatsAggregator.summary() of the window
    latencies_ms: list[float]    # camera-to-action latencies of the window
    batch_sizes: list[int]       # frames decoded together, per chunk of the window


class ArmChannel:
    """Arm number `index`, named `name` ('' = the node's own topics), with a statistics window
    of `stats_window` chunks."""

    def __init__(self, index: int, name: str, stats_window: int) -> None:
        self.index, self.name = index, name
        self.label = f'{name}: ' if name else ''       # prefix of the arm's log lines
        # The arm's topics, created by the node in configure (None before, or when unused).
        self.chunk_pub: Any = None
        self.stats_pub: Any = None
        self.image_sub: Any = None
        self.instruction_sub: Any = None
        self.joints_sub: Any = None
        self.said_waiting = False                     # 'waiting for an instruction' said once
        self._lock = threading.Lock()
        self._counters = PolicyCounters()
        self._reported = PolicyCounters()
        self._error: str | None = None
        self._aggregator = StatsAggregator(stats_window)
        self._latencies: list[float] = []
        self._batches: list[int] = []

    def topic(self, name: str) -> str:
        """The relative name of topic `name` of this arm."""
        return f'{self.name}/{name}' if self.name else name

    def status_name(self, node_name: str) -> str:
        """The name of this arm's diagnostics status ('<node>: [<arm> ]inference')."""
        return f'{node_name}: {self.name} inference' if self.name else f'{node_name}: inference'

    def entities(self) -> list:
        """The arm's publishers and subscriptions that exist."""
        return [e for e in (self.chunk_pub, self.stats_pub, self.image_sub,
                            self.instruction_sub, self.joints_sub) if e is not None]

    def count(self, **increments: int) -> None:
        """Add to the arm's counters (PolicyCounters field names)."""
        with self._lock:
            for name, amount in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + amount)

    def failed(self, summary: str) -> None:
        """Count an engine error; the arm reports it until one of its chunks succeeds."""
        with self._lock:
            self._counters.errors += 1
            self._error = summary

    def published(self, stats: ChunkStats, latency_ms: float, clipped: int, batch: int,
                  window: int) -> dict[str, int]:
        """Record a published chunk (camera-to-action latency in ms, values clipped, frames
        decoded with it); the counters since start, `clipped` as `clipped_total`."""
        with self._lock:
            self._counters.chunks += 1
            self._counters.clipped += clipped
            self._error = None
            self._aggregator.add(stats)
            self._latencies = (self._latencies + [latency_ms])[-window:]
            self._batches = (self._batches + [batch])[-window:]
            totals = asdict(self._counters)
        totals['clipped_total'] = totals.pop('clipped')
        return totals

    def reset_window(self, size: int) -> None:
        """Start a new statistics window of `size` chunks."""
        with self._lock:
            self._aggregator = StatsAggregator(size)
            self._latencies, self._batches = [], []

    def report(self) -> ArmReport:
        """The arm's figures now; the next report's `new` counts from here."""
        with self._lock:
            counters = replace(self._counters)
            new, self._reported = counters.since(self._reported), counters
            return ArmReport(counters, new, self._error, self._aggregator.summary(),
                             list(self._latencies), list(self._batches))
