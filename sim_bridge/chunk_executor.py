"""Action-chunk bookkeeping for the sim bridge: validation and step scheduling, no ROS, no LIBERO.

A chunk is a trajectory_msgs/JointTrajectory seen as plain numbers (`ChunkMessage`): one point
per control step, `positions` = the action, `time_from_start` = when the point is due relative
to `stamp`, and `stamp` = the stamp of the image the chunk was computed from. Times are
integer nanoseconds on the ROS clock (stamps) or float seconds (durations).

- `ChunkValidator` turns a message into a `Chunk` or raises `ChunkRejected` with the reason.
- `LockstepExecutor`: the sim waits for each chunk; its first `horizon` points (all by default)
  are executed, then the bridge observes again. A rejected answer makes the arm hold still for
  one execution horizon.
- `RealtimeExecutor`: the sim runs on the wall clock; at each tick it executes the point of the
  newest chunk that is due at the tick's time. Points whose time passed before the chunk
  arrived are skipped (delay compensation from the stamp); with no due point the arm holds.

Holding = zero deltas with the last commanded gripper value (`hold_action`).
"""

from dataclasses import dataclass, field

import numpy as np

GRIPPER_OPEN = -1.0
# Points of each chunk executed before the bridge observes again, unless told otherwise (the
# bridge's `observation_interval`, `rsd eval-libero --execute`); chosen on the trained default's
# 8-point chunks by the README's execution-horizon table.
EXECUTION_HORIZON = 4
# No previous chunk's rest to blend with: [0, 0].
NOTHING_SUPERSEDED = np.zeros((0, 0), dtype=np.float32)


def chunks_overlap(mode: str, horizon: int) -> bool:
    """Whether consecutive chunks cover the same steps, as a temporal ensemble needs: lockstep
    with an execution horizon (0 = whole chunks never overlap; real time replaces chunks)."""
    return mode == 'lockstep' and horizon > 0


def hold_action(gripper: float = GRIPPER_OPEN, dim: int = 7) -> np.ndarray:
    """Zero-delta action keeping the gripper command (last dim). [dim] float32."""
    action = np.zeros(dim, dtype=np.float32)
    action[-1] = gripper
    return action


class ChunkRejected(ValueError):
    """A chunk the bridge will not execute; the text says what was wrong and what was expected."""


@dataclass(frozen=True)
class ChunkMessage:
    """A JointTrajectory as plain numbers."""
    stamp_ns: int                             # header.stamp, ns
    joint_names: tuple[str, ...]
    positions: tuple[tuple[float, ...], ...]  # [T][A], one tuple per point
    time_from_start: tuple[float, ...]        # [T] s
    received_ns: int = 0                      # arrival time on the stamp's clock, ns


@dataclass(frozen=True)
class Chunk:
    """A validated chunk."""
    stamp_ns: int
    actions: np.ndarray       # [T, A] float32
    offsets: np.ndarray       # [T] s after the stamp at which each point starts (first = 0)
    period: float             # s, mean spacing of the points (duration of the last point)
    received_ns: int

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def latency(self) -> float:
        """Arrival minus stamp, s: the camera-to-action latency."""
        return (self.received_ns - self.stamp_ns) * 1e-9


@dataclass
class ChunkValidator:
    """Checks chunks against what the bridge executes.

    action_names: the expected joint_names, in order (their count is the action size A).
    chunk_len: expected number of points (0 accepts any number >= 1).
    default_period: s, point spacing of a one-point chunk (time_from_start cannot give it).
    action_limit: the arm's action range is [-action_limit, action_limit] in every dim (OSC_POSE
    inputs are normalised to [-1, 1]); a position beyond it refuses the chunk. Positions are
    checked in float32, the precision `step` executes them in (1e300 is finite as float64 and
    infinite as float32).
    """
    action_names: tuple[str, ...]
    chunk_len: int = 8
    default_period: float = 0.05
    action_limit: float = 1.0

    def __call__(self, msg: ChunkMessage) -> Chunk:
        names = tuple(msg.joint_names)
        if names != tuple(self.action_names):
            raise ChunkRejected(f'joint_names {list(names)}; expected {list(self.action_names)}')
        count = len(msg.positions)
        if count == 0 or (self.chunk_len and count != self.chunk_len):
            expected = self.chunk_len if self.chunk_len else 'at least 1'
            raise ChunkRejected(f'{count} points; expected {expected}')
        dim = len(self.action_names)
        for index, point in enumerate(msg.positions):
            if len(point) != dim:
                raise ChunkRejected(f'point {index} has {len(point)} positions; expected {dim} '
                                    '(one per joint name)')
        with np.errstate(over='ignore'):
            actions = np.array(msg.positions, dtype=np.float64).astype(np.float32)  # [T, A]
        if not np.isfinite(actions).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(actions))[:, 0]})
            raise ChunkRejected(f'non-finite positions (NaN, Inf, or beyond float32) in points '
                                f'{bad}')
        beyond = np.abs(actions) > self.action_limit
        if beyond.any():
            bad = sorted({int(i) for i in np.argwhere(beyond)[:, 0]})
            raise ChunkRejected(f'positions beyond the action range +-{self.action_limit} in '
                                f'points {bad} (max |x| = {float(np.abs(actions).max()):.3g})')
        if len(msg.time_from_start) != count:
            raise ChunkRejected(f'{len(msg.time_from_start)} time_from_start values for '
                                f'{count} points; expected one per point')
        times = np.array(msg.time_from_start, dtype=np.float64)  # [T]
        if not np.isfinite(times).all() or (times < 0).any():
            raise ChunkRejected(f'time_from_start {times.tolist()} s; expected finite values '
                                '>= 0')
        if count > 1 and not (np.diff(times) > 0).all():
            raise ChunkRejected(f'time_from_start {times.tolist()} s; expected strictly '
                                'increasing values (one control period apart)')
        period = (times[-1] - times[0]) / (count - 1) if count > 1 else self.default_period
        return Chunk(stamp_ns=int(msg.stamp_ns), actions=actions,
                     offsets=times - times[0], period=float(period),
                     received_ns=int(msg.received_ns))


@dataclass
class ExecutorCounters:
    """What happened to the control steps and chunks of one episode."""
    steps: int = 0              # control steps executed
    held_steps: int = 0         # steps executed as hold (no chunk point available / rejected)
    skipped_steps: int = 0      # chunk points never executed because their time had passed
    superseded_steps: int = 0   # chunk points dropped because a newer chunk arrived
    executed_chunks: int = 0    # valid chunks whose points were (at least partly) executed
    rejected_chunks: int = 0    # chunks that failed validation
    stale_chunks: int = 0       # valid-looking chunks not answering an awaited observation
    latencies: list[float] = field(default_factory=list)  # s, per accepted chunk

    def as_dict(self) -> dict:
        """The counters as a plain dict (latencies left out)."""
        return {key: value for key, value in self.__dict__.items() if key != 'latencies'}


class LockstepExecutor:
    """Observation -> chunk -> its first `horizon` points -> next observation.

    `expect(stamp)` registers a published observation (a republished one adds its new stamp:
    the sim has not moved, so an answer to any of them is valid). `offer` takes a message and
    returns True when it answered the awaited observation; its first `horizon` points (or a hold
    of that many steps if it was rejected) are then handed out by `next_action`.

    horizon: points executed per chunk before observing again (the execution horizon); 0 = all
    of them (a rejected chunk then holds for `validator.chunk_len` steps, or 1 if that is 0).
    Points beyond it count as `superseded_steps`.
    ensemble: a two-chunk, equal-weight variant of ACT's temporal ensemble (Zhao et al. 2023):
    each arm value executed is the mean of the new chunk's point and the previous chunk's
    superseded point for the same step, where there is one; the gripper follows the new chunk.
    A mean of validated points stays within the validated range. Needs 0 < horizon < chunk
    length to have any effect; a rejected chunk or a hold starts afresh.
    """

    def __init__(self, validator: ChunkValidator, horizon: int = 0, ensemble: bool = False):
        if horizon < 0:
            raise ValueError(f'horizon must be >= 0 (0 = every point), got {horizon}')
        self.validator = validator
        self.horizon = horizon
        self.ensemble = ensemble
        self.counters = ExecutorCounters()
        self.gripper = GRIPPER_OPEN
        self._awaited: set[int] = set()
        self._plan: list[tuple[np.ndarray, bool]] = []   # (action [A], is_hold)
        self._superseded = NOTHING_SUPERSEDED  # [S, A] previous chunk's rest

    def expect(self, stamp_ns: int, new_observation: bool = True) -> None:
        """Await an answer to the observation stamped `stamp_ns` (ns); a new
        observation forgets the earlier stamps and the remaining plan."""
        if new_observation:
            self._awaited.clear()
            self._plan.clear()
        self._awaited.add(int(stamp_ns))

    @property
    def awaiting(self) -> bool:
        """True while no chunk has answered the awaited observation."""
        return bool(self._awaited)

    def offer(self, msg: ChunkMessage) -> bool:
        """Consider one message; raises ChunkRejected (after planning a hold) if invalid."""
        if int(msg.stamp_ns) not in self._awaited:
            self.counters.stale_chunks += 1
            return False
        self._awaited.clear()
        try:
            chunk = self.validator(msg)
        except ChunkRejected:
            self.counters.rejected_chunks += 1
            count = self.horizon or self.validator.chunk_len or 1
            hold = hold_action(self.gripper, len(self.validator.action_names))
            self._plan = [(hold, True)] * count
            self._superseded = NOTHING_SUPERSEDED
            raise
        self.counters.executed_chunks += 1
        self.counters.latencies.append(chunk.latency)
        kept = chunk.actions[:self.horizon or None]  # [H, A]
        self.counters.superseded_steps += len(chunk.actions) - len(kept)
        if self.ensemble:
            kept = blend_overlap(kept, self._superseded)
            self._superseded = chunk.actions[len(kept):]  # [T - H, A]
        self._plan = [(action, False) for action in kept]
        return True

    @property
    def remaining(self) -> int:
        """Planned steps not yet handed out."""
        return len(self._plan)

    def next_action(self) -> np.ndarray:
        """The next planned action [A]; call only while `remaining` > 0."""
        if not self._plan:
            raise RuntimeError('no planned action: offer an answering chunk first')
        action, is_hold = self._plan.pop(0)
        self.counters.steps += 1
        self.counters.held_steps += int(is_hold)
        self.gripper = float(action[-1])
        return action


def blend_overlap(kept: np.ndarray, superseded: np.ndarray) -> np.ndarray:
    """Temporal ensemble of a new chunk's first points `kept` [H, A] with the points of the
    previous chunk planned for the same steps, `superseded` [S, A] (S may be 0 or differ from
    H). The first min(H, S) arm values become the mean of the two; the gripper (last dim) stays
    the new chunk's. Returns [H, A] float32."""
    overlap = min(len(kept), len(superseded))
    if overlap == 0:
        return kept
    blended = kept.copy()
    blended[:overlap, :-1] = 0.5 * (kept[:overlap, :-1] + superseded[:overlap, :-1])
    return blended


class RealtimeExecutor:
    """Wall-clock execution of the newest chunk.

    Point k of a chunk is due during [t_obs + offsets[k], t_obs + offsets[k] + spacing), t_obs
    being the time of the chunk's observation (its stamp, unless `offer` is told otherwise). The
    tick at time t executes the point due at t; ticks with nothing due hold the arm. A chunk
    older than (or as old as) the current one is stale and ignored; a newer one replaces it.
    """

    def __init__(self, validator: ChunkValidator):
        self.validator = validator
        self.counters = ExecutorCounters()
        self.gripper = GRIPPER_OPEN
        self._chunk: Chunk | None = None
        self._starts: np.ndarray | None = None   # [T] ns, when each point becomes due
        self._end_ns = 0                         # ns, when the last point stops being due
        self._last_index = -1                    # last executed point of the current chunk

    @property
    def current(self) -> Chunk | None:
        """The chunk being executed (None before the first valid one)."""
        return self._chunk

    def offer(self, msg: ChunkMessage, observed_at_ns: int | None = None) -> bool:
        """Take a message; True if it became the current chunk. Raises ChunkRejected if invalid.

        observed_at_ns: when, on the clock of `action_at`, the chunk's observation was taken
        (its point 0 is due then). Default: the stamp itself. The bridge passes the simulated
        time of the observation; the latency is always measured from the real stamp.
        """
        try:
            chunk = self.validator(msg)
        except ChunkRejected:
            self.counters.rejected_chunks += 1
            raise
        if self._chunk is not None and chunk.stamp_ns <= self._chunk.stamp_ns:
            self.counters.stale_chunks += 1
            return False
        self.counters.latencies.append(chunk.latency)
        self._retire(superseded=True)
        base = chunk.stamp_ns if observed_at_ns is None else int(observed_at_ns)
        self._chunk = chunk
        self._starts = base + np.round(chunk.offsets * 1e9).astype(np.int64)
        self._end_ns = int(self._starts[-1]) + round(chunk.period * 1e9)
        self._last_index = -1
        return True

    def _retire(self, superseded: bool) -> None:
        """Account for the current chunk's points that will never run, and drop it."""
        if self._chunk is None:
            return
        left = len(self._chunk) - 1 - self._last_index
        if superseded:
            self.counters.superseded_steps += left
        else:
            self.counters.skipped_steps += left
        self._chunk = None

    def remaining(self, t_ns: int) -> int:
        """Points of the current chunk due at or after the tick at `t_ns`."""
        if self._chunk is None or t_ns >= self._end_ns:
            return 0
        return len(self._chunk) - max(self._index_at(t_ns), 0)

    def _index_at(self, t_ns: int) -> int:
        return int(np.searchsorted(self._starts, t_ns, side='right')) - 1

    def action_at(self, t_ns: int) -> np.ndarray:
        """Action [A] for the control tick starting at `t_ns`; counts the step."""
        self.counters.steps += 1
        if self._chunk is not None and t_ns >= self._end_ns:
            self._retire(superseded=False)
        index = self._index_at(t_ns) if self._chunk is not None else -1
        if index < 0:
            self.counters.held_steps += 1
            return hold_action(self.gripper, len(self.validator.action_names))
        if self._last_index < 0:
            self.counters.executed_chunks += 1
        self.counters.skipped_steps += max(index - self._last_index - 1, 0)
        self._last_index = max(index, self._last_index)
        action = self._chunk.actions[index]
        self.gripper = float(action[-1])
        return action


def percentile_summary(values: list[float], scale: float = 1e3) -> dict:
    """p50/p90/p99/mean/max of `values` times `scale` (s -> ms by default), plus n."""
    if not values:
        return {'n': 0, 'p50': None, 'p90': None, 'p99': None, 'mean': None, 'max': None}
    data = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {'n': len(values), 'p50': float(p50), 'p90': float(p90), 'p99': float(p99),
            'mean': float(data.mean()), 'max': float(data.max())}


def next_due(due: float, now: float, period: float) -> float:
    """When the tick after one due at `due` that ran at `now` is due (s, monotonic clock).

    On schedule (less than a period late): `due + period`, so jitter does not drift the rate.
    A period or more late: `now + period`. No catching up: while the simulator is busy (a
    render) the simulated world pauses instead of fast-forwarding through missed ticks.
    """
    return due + period if now - due < period else now + period
