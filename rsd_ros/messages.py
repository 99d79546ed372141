"""Engine outputs -> ROS messages, as pure functions (no node, no executor; unit-tested alone).

- `chunk_to_trajectory`: actions [T, A] -> trajectory_msgs/JointTrajectory, positions clipped
  to the action limits and packed as the topic contract says (`rsd_ros.topics.pack_chunk`).
- `stats_json`: one ChunkStats (+ node-side figures) -> the `policy_stats` JSON line, with the
  source image's stamp so a listener can match it to the chunk.
- `joint_state_vector`: sensor_msgs/JointState -> the robot state [P] a model with
  proprioception takes, picked by joint name (any order, extra joints ignored).
- `inference_status`: counters and aggregated statistics -> a diagnostic_msgs/DiagnosticStatus
  the way diagnostic_updater builds them ('<node name>: <task>', hardware_id, OK/WARN/ERROR,
  key/values as text).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
import json
import math

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory

from rsd_core.stats import ChunkStats
from rsd_ros.excerpt import excerpt
from rsd_ros.topics import pack_chunk


def clip_chunk(actions: np.ndarray, low: Sequence[float], high: Sequence[float],
               ) -> tuple[np.ndarray, int]:
    """Clip actions [T, A] to per-dimension limits [A]; returns (clipped [T, A], values clipped).

    Raises ValueError on a shape mismatch or non-finite actions (never publish those).
    """
    actions = np.asarray(actions, dtype=np.float64)
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if actions.ndim != 2 or low.shape != (actions.shape[1],) or high.shape != low.shape:
        raise ValueError(f'actions {list(actions.shape)} do not match limits of '
                         f'{low.shape[0]} / {high.shape[0]} dims; expected [T, A] and [A]')
    if not np.isfinite(actions).all():
        raise ValueError(f'engine returned non-finite actions: {actions.tolist()}')
    clipped = np.clip(actions, low, high)
    return clipped, int((clipped != actions).sum())


def chunk_to_trajectory(actions: np.ndarray, stamp: Time, frame_id: str,
                        joint_names: Sequence[str], control_period: float,
                        low: Sequence[float], high: Sequence[float],
                        ) -> tuple[JointTrajectory, int]:
    """Actions [T, A] in action units -> (JointTrajectory with T points of A positions, clipped).

    header.stamp = `stamp` (the source image's), point i at (i + 1) x control_period.
    """
    clipped, n_clipped = clip_chunk(actions, low, high)
    if len(joint_names) != clipped.shape[1]:
        raise ValueError(f'{len(joint_names)} joint names for {clipped.shape[1]} action dims')
    return pack_chunk(clipped, stamp, frame_id, joint_names, control_period), n_clipped


def joint_state_vector(msg: JointState, names: Sequence[str]) -> np.ndarray:
    """The positions of `names` in `msg` (rad or m, as published) -> [P] float32.

    ValueError (a stable text, fit to log once) when name and position lengths differ, a name
    is missing or repeated, or a position is not finite.
    """
    if len(msg.position) != len(msg.name):
        raise ValueError(f'joint_states has {len(msg.name)} names but {len(msg.position)} '
                         'positions')
    index = {name: i for i, name in enumerate(msg.name)}
    if len(index) != len(msg.name):
        raise ValueError(f'joint_states repeats joint names: {excerpt(list(msg.name))}')
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f'joint_states lacks {excerpt(missing)} (the model reads '
                         f'{list(names)}; received {excerpt(list(msg.name))})')
    state = np.array([msg.position[index[n]] for n in names], dtype=np.float32)  # [P]
    if not np.isfinite(state).all():
        raise ValueError(f'joint_states positions of {list(names)} are not all finite')
    return state


def _plain(value):
    """JSON-safe: numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def stats_json(stats: ChunkStats, stamp: Time, **extra) -> str:
    """One `policy_stats` line: the chunk's stamp {sec, nanosec}, ChunkStats fields, `extra`
    (the node adds its timings, counters and `batch`, the number of frames decoded together;
    with several arms in one batch, the ChunkStats are the batch's)."""
    record = {'stamp': {'sec': stamp.sec, 'nanosec': stamp.nanosec}, **asdict(stats), **extra}
    return json.dumps({key: _plain(value) for key, value in record.items()}, allow_nan=False)


@dataclass
class PolicyCounters:
    """Cumulative event counts of the policy node since start."""

    frames: int = 0            # images received
    chunks: int = 0            # chunks published
    dropped: int = 0           # images replaced by a newer one before inference took them
    stale: int = 0             # images older than max_image_age when inference took them
    clipped: int = 0           # action values clipped to the limits
    bad_images: int = 0        # images refused (encoding, size, step, data length)
    bad_instructions: int = 0  # instructions refused (empty, whitespace, not UTF-8)
    no_state: int = 0          # images not acted on: no usable joint_states (proprio models)
    inactive: int = 0          # images received while the node was not active (lifecycle)
    future: int = 0            # images stamped in the future beyond max_clock_skew
    bad_state: int = 0         # images not acted on: robot state beyond max_state_abs
    errors: int = 0            # engine exceptions

    def since(self, earlier: 'PolicyCounters') -> 'PolicyCounters':
        """Counts between `earlier` and now."""
        return PolicyCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                           for f in fields(self)})


def status_level(new: PolicyCounters, *, waiting_for_instruction: bool, error: str | None,
                 active: bool = True) -> tuple[bytes, str]:
    """(level, message) from the counts of the last period and the node's state.

    WARN while the (lifecycle) node is inactive; ERROR while the last inference failed (until a
    chunk succeeds); WARN when no instruction
    is in force, no image arrived, or images arrived but none gave a chunk, or some were stale,
    bad or without the joint states the model needs; OK otherwise. Dropped frames are normal
    (camera faster than inference).
    """
    if not active:
        return DiagnosticStatus.WARN, 'inactive: not acting on frames (lifecycle)'
    if error:
        return DiagnosticStatus.ERROR, f'inference failed: {error}'
    if waiting_for_instruction:
        return DiagnosticStatus.WARN, 'waiting for an instruction'
    if new.frames == 0 and new.chunks == 0:
        return DiagnosticStatus.WARN, 'no camera images received'
    problems = [f'{count} {what}' for count, what in ((new.stale, 'stale images'),
                                                      (new.bad_images, 'bad images'),
                                                      (new.bad_instructions, 'bad instructions'),
                                                      (new.no_state, 'images without joint '
                                                                     'states'),
                                                      (new.future, 'images stamped in the future'),
                                                      (new.bad_state, 'robot states out of '
                                                                      'range'))
                if count]
    if new.chunks == 0:
        return DiagnosticStatus.WARN, 'no chunk published' + (
            f' ({", ".join(problems)})' if problems else ' yet')
    if problems:
        return DiagnosticStatus.WARN, f'{new.chunks} chunks; ' + ', '.join(problems)
    return DiagnosticStatus.OK, f'{new.chunks} chunks'


def _text(value) -> str:
    if value is None:
        return 'n/a'
    if isinstance(value, float):
        return f'{value:.2f}'
    return str(value)


def mode_name(use_draft: bool, acceptance: str) -> str:
    """The decoding mode as diagnostics name it: 'bounded' (certified depth, with or without
    the draft), else the draft's acceptance rule, or 'main-only' without the draft."""
    if acceptance == 'bounded':
        return acceptance
    return acceptance if use_draft else 'main-only'


def status_values(summary: dict, latency_ms: Sequence[float], counters: PolicyCounters,
                  use_draft: bool, mode: str, batch_sizes: Sequence[int] = ()) -> dict[str, str]:
    """Key values of the inference status.

    summary: `StatsAggregator.summary()` of the recent window; latency_ms: camera-to-action
    latencies of the same window (publish time - image stamp); batch_sizes: frames decoded
    together for each chunk of the window (several arms).
    """
    latency = np.asarray(latency_ms, dtype=np.float64)
    p50, p90 = (np.percentile(latency, [50, 90]).tolist() if latency.size else (None, None))
    batch = float(np.mean(batch_sizes)) if len(batch_sizes) else None
    times = summary['latency_ms']
    proposed = summary['layers_proposed']
    values = {
        'latency p50 ms': p50,
        'latency p90 ms': p90,
        'engine total p50 ms': times['total']['p50'],
        'engine total p90 ms': times['total']['p90'],
        **{f'{phase} ms': times[phase]['p50']
           for phase in ('preprocess', 'prefill', 'draft', 'verify', 'step', 'certify',
                         'decode')},
        'layers decoded': summary['layers_decoded']['mean'],
        'certified bound max': summary['certified_bound_max'],
        'K chosen mean': summary['k_chosen']['mean'],
        'acceptance rate': summary['layers_accepted'] / proposed if proposed else None,
        'mean accepted layers': summary['mean_accepted_layers'],
        'main passes': summary['main_passes']['mean'],
        'near ties': summary['near_ties'],
        'max deviation': summary['max_deviation'],
        'window chunks': summary['chunks'],
        'batch size mean': batch,
        **{name.replace('_', ' '): count for name, count in asdict(counters).items()},
        'use_draft': use_draft,
        'mode': mode,
    }
    return {key: _text(value) for key, value in values.items()}


def inference_status(name: str, hardware_id: str, level: bytes, message: str,
                     values: dict[str, str]) -> DiagnosticStatus:
    """DiagnosticStatus as diagnostic_updater builds it (name is '<node name>: <task>')."""
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])


def diagnostic_array(stamp: Time, statuses: Sequence[DiagnosticStatus]) -> DiagnosticArray:
    """A DiagnosticArray of `statuses` stamped `stamp`."""
    msg = DiagnosticArray(status=list(statuses))
    msg.header.stamp = stamp
    return msg
