"""Chunk -> JointTrajectory, stats -> policy_stats JSON and diagnostics, without a node."""

import json

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import pytest
from sensor_msgs.msg import JointState

from rsd_core.bundle import DEFAULT_ACTION_NAMES
from rsd_core.stats import ChunkStats, StatsAggregator
from rsd_ros.messages import PolicyCounters as Counters
from rsd_ros.messages import (
    chunk_to_trajectory,
    clip_chunk,
    diagnostic_array,
    inference_status,
    joint_state_vector,
    stats_json,
    status_level,
    status_values,
)
from rsd_ros.topics import duration, stamp_ns, time_msg, unpack_chunk

LOW, HIGH = [-1.0] * 7, [1.0] * 7
STAMP = Time(sec=12, nanosec=345_000_000)


def test_trajectory_layout():
    actions = np.linspace(-0.5, 0.5, 56, dtype=np.float32).reshape(8, 7)
    msg, clipped = chunk_to_trajectory(actions, STAMP, 'base', DEFAULT_ACTION_NAMES, 0.05,
                                       LOW, HIGH)
    assert clipped == 0
    assert msg.header.stamp == STAMP and msg.header.frame_id == 'base'
    assert msg.joint_names == list(DEFAULT_ACTION_NAMES)
    assert len(msg.points) == 8 and all(len(p.positions) == 7 for p in msg.points)
    np.testing.assert_allclose([p.positions for p in msg.points], actions, rtol=1e-7)
    # point i is due when control step i ends: (i + 1) x period, exact to the nanosecond
    assert [stamp_ns(p.time_from_start) for p in msg.points] == [
        (i + 1) * 50_000_000 for i in range(8)]


def test_clipping_counts_values_outside_the_limits():
    actions = np.zeros((8, 7))
    actions[0, 0], actions[3, 6], actions[7, 2] = 1.5, -3.0, 0.99
    msg, clipped = chunk_to_trajectory(actions, STAMP, '', DEFAULT_ACTION_NAMES, 0.05,
                                       LOW, [1.0] * 6 + [0.5])
    assert clipped == 2
    assert msg.points[0].positions[0] == 1.0 and msg.points[3].positions[6] == -1.0
    assert msg.points[7].positions[2] == pytest.approx(0.99)


def test_non_finite_or_misshaped_actions_are_refused():
    actions = np.zeros((8, 7))
    actions[2, 3] = np.nan
    with pytest.raises(ValueError, match='non-finite'):
        clip_chunk(actions, LOW, HIGH)
    with pytest.raises(ValueError, match=r'\[T, A\] and \[A\]'):
        clip_chunk(np.zeros((8, 6)), LOW, HIGH)
    with pytest.raises(ValueError, match='6 joint names for 7 action dims'):
        chunk_to_trajectory(np.zeros((8, 7)), STAMP, '', DEFAULT_ACTION_NAMES[:6], 0.05,
                            LOW, HIGH)


def test_duration_rounds_to_nanoseconds():
    assert (duration(0.35).sec, duration(0.35).nanosec) == (0, 350_000_000)
    assert (duration(2.5).sec, duration(2.5).nanosec) == (2, 500_000_000)


def test_a_packed_chunk_unpacks_to_the_same_numbers():
    actions = np.linspace(-0.5, 0.5, 56).reshape(8, 7)
    msg, _ = chunk_to_trajectory(actions, STAMP, 'base', DEFAULT_ACTION_NAMES, 0.1, LOW, HIGH)
    stamp, names, positions, times = unpack_chunk(msg)
    assert stamp == stamp_ns(STAMP) == 12_345_000_000 and time_msg(stamp) == STAMP
    assert names == tuple(DEFAULT_ACTION_NAMES)
    np.testing.assert_array_equal(positions, actions)
    np.testing.assert_allclose(times, [0.1 * (i + 1) for i in range(8)], rtol=0, atol=1e-9)


def test_stats_json_carries_the_stamp_and_every_field():
    stats = ChunkStats(total_ms=12.5, main_passes=4, layers_proposed=3, layers_accepted=2,
                       accepted_by_depth=[True, True, False], used_draft=True,
                       acceptance='exact', max_deviation=float('nan'))
    record = json.loads(stats_json(stats, STAMP, latency_ms=np.float32(15.0), dropped=3))
    assert record['stamp'] == {'sec': 12, 'nanosec': 345_000_000}
    assert record['total_ms'] == 12.5 and record['accepted_by_depth'] == [True, True, False]
    assert record['latency_ms'] == 15.0 and record['dropped'] == 3
    assert record['max_deviation'] is None          # NaN is not JSON
    assert set(ChunkStats().as_dict()) <= set(record)


@pytest.mark.parametrize('new, waiting, error, level, text', [
    (Counters(frames=30, chunks=5, dropped=25), False, None, DiagnosticStatus.OK, '5 chunks'),
    (Counters(frames=30, chunks=5, stale=2), False, None, DiagnosticStatus.WARN, '2 stale'),
    (Counters(frames=30), False, None, DiagnosticStatus.WARN, 'no chunk published yet'),
    (Counters(frames=3, bad_images=3), False, None, DiagnosticStatus.WARN, '3 bad images'),
    (Counters(), False, None, DiagnosticStatus.WARN, 'no camera images'),
    (Counters(frames=30), True, None, DiagnosticStatus.WARN, 'waiting for an instruction'),
    (Counters(frames=30, chunks=4), False, 'ValueError: x', DiagnosticStatus.ERROR,
     'inference failed: ValueError: x'),
])
def test_status_level(new, waiting, error, level, text):
    got_level, message = status_level(new, waiting_for_instruction=waiting, error=error)
    assert got_level == level and text in message


def test_status_values_and_diagnostic_array():
    aggregator = StatsAggregator()
    for accepted in (1, 3):
        aggregator.add(ChunkStats(total_ms=100.0 + accepted, prefill_ms=60.0, main_passes=5,
                                  layers_proposed=3, layers_accepted=accepted, used_draft=True,
                                  acceptance='exact'))
    counters = Counters(frames=40, chunks=2, dropped=30, stale=1, clipped=7, errors=1)
    values = status_values(aggregator.summary(), [110.0, 120.0], counters, True, 'exact')
    assert values['latency p50 ms'] == '115.00' and values['engine total p90 ms'] == '102.80'
    assert values['acceptance rate'] == '0.67' and values['mean accepted layers'] == '2.00'
    assert values['dropped'] == '30' and values['clipped'] == '7' and values['errors'] == '1'
    assert values['bad images'] == '0' and values['frames'] == '40'
    assert values['use_draft'] == 'True' and values['mode'] == 'exact'
    assert values['draft ms'] == '0.00' and values['main passes'] == '5.00'

    empty = status_values(StatsAggregator().summary(), [], Counters(), False, 'exact')
    assert empty['latency p50 ms'] == 'n/a' and empty['acceptance rate'] == 'n/a'

    status = inference_status('rsd_policy: inference', 'cpu', DiagnosticStatus.OK, 'ok', values)
    msg = diagnostic_array(STAMP, [status])
    assert msg.header.stamp == STAMP and msg.status[0].name == 'rsd_policy: inference'
    assert msg.status[0].hardware_id == 'cpu'
    assert {kv.key: kv.value for kv in msg.status[0].values} == values


def test_counters_since():
    assert Counters(frames=10, dropped=4).since(Counters(frames=7, dropped=1)) == \
        Counters(frames=3, dropped=3)


def test_joint_state_vector_picks_the_model_joints_by_name():
    msg = JointState(name=['j3', 'x', 'j1', 'j2'], position=[3.0, 9.0, 1.0, 2.0])
    state = joint_state_vector(msg, ('j1', 'j2', 'j3'))
    assert state.dtype == np.float32 and state.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize('msg, message', [
    (JointState(name=['j1', 'j2'], position=[1.0]), '2 names but 1 positions'),
    (JointState(name=['j1', 'j1'], position=[1.0, 2.0]), 'repeats joint names'),
    (JointState(name=['j1'], position=[1.0]), r"lacks \['j2'\]"),
    (JointState(name=['j1', 'j2'], position=[1.0, float('nan')]), 'not all finite'),
])
def test_joint_state_vector_refuses_unusable_messages(msg, message):
    with pytest.raises(ValueError, match=message):
        joint_state_vector(msg, ('j1', 'j2'))


def test_stamp_and_state_rules():
    from rsd_ros.frame_checks import stamp_problem, state_problem

    now = 1_000 * 10**9
    assert stamp_problem(now - 10**8, now, 0.5, 0.5) is None
    assert stamp_problem(now - 10**9, now, 0.5, 0.5)[0] == 'stale'
    assert stamp_problem(now - 10**12, now, 0.0, 0.5) is None            # no age limit
    assert stamp_problem(now + 10**8, now, 0.5, 0.5) is None             # within the skew
    assert stamp_problem(now + 3600 * 10**9, now, 0.5, 0.5)[0] == 'future'
    assert stamp_problem(-2 * 10**18, now, 0.5, 0.5)[0] == 'future'     # a wrapped int32 stamp
    names = ('a', 'b', 'c')
    assert state_problem(np.array([0.1, -3.0, 0.04]), names, 10.0) is None
    assert "['b']" in state_problem(np.array([0.1, 1e30, 0.04]), names, 10.0)
    assert "['c']" in state_problem(np.array([0.1, 0.2, np.nan]), names, 10.0)


def test_excerpts_cut_long_values_and_say_their_length():
    from rsd_ros.excerpt import excerpt
    from rsd_ros.log_limiter import LogLimiter

    assert excerpt('rgb8') == "'rgb8'"
    cut = excerpt('x' * 200_000)
    assert len(cut) < 120 and '(200000 characters)' in cut
    clock = [0.0]
    limiter = LogLimiter(memory=4, burst=2, period=60.0, clock=lambda: clock[0])
    assert limiter.admit('a') == (True, 0) and limiter.admit('a') == (False, 0)
    assert limiter.admit('b') == (True, 0)
    assert limiter.admit('c') == (False, 0) and limiter.admit('d') == (False, 0)   # burst used
    clock[0] = 61.0
    assert limiter.admit('e') == (True, 2)                    # says what was suppressed
