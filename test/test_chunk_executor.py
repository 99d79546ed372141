"""Chunk validation and lockstep / real-time step scheduling: pure logic, no ROS, no LIBERO."""

import numpy as np
import pytest

from sim_bridge.chunk_executor import (
    ChunkMessage,
    ChunkRejected,
    ChunkValidator,
    LockstepExecutor,
    RealtimeExecutor,
    hold_action,
    next_due,
    percentile_summary,
)

NAMES = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
MS = 1_000_000  # ns
T0 = 1_700_000_000 * 1_000_000_000  # a realistic ROS time, ns


def message(stamp_ns=T0, points=8, names=NAMES, received_ns=None, period=0.05, first=1,
            value=None, gripper=1.0):
    """A chunk whose point k has positions [k, k, ..., k, gripper] (or `value`)."""
    positions = []
    for k in range(points):
        point = [float(k) if value is None else value] * (len(names) - 1) + [gripper]
        positions.append(tuple(point))
    return ChunkMessage(stamp_ns=stamp_ns, joint_names=tuple(names), positions=tuple(positions),
                        time_from_start=tuple((k + first) * period for k in range(points)),
                        received_ns=stamp_ns + 30 * MS if received_ns is None else received_ns)


def validator(chunk_len=8, action_limit=100.0):
    """A validator; the point values k = 0..7 of `message` need a wide action range."""
    return ChunkValidator(action_names=NAMES, chunk_len=chunk_len, default_period=0.05,
                          action_limit=action_limit)


def with_positions(msg, index, point):
    positions = list(msg.positions)
    positions[index] = tuple(point)
    return ChunkMessage(msg.stamp_ns, msg.joint_names, tuple(positions), msg.time_from_start,
                        msg.received_ns)


# --- validation -------------------------------------------------------------------------------

def test_valid_chunk_gives_actions_offsets_period_latency():
    chunk = validator()(message(received_ns=T0 + 42 * MS))
    assert chunk.actions.shape == (8, 7) and chunk.actions.dtype == np.float32
    np.testing.assert_allclose(chunk.actions[:, 0], np.arange(8))
    np.testing.assert_allclose(chunk.offsets, np.arange(8) * 0.05, atol=1e-12)
    assert chunk.period == pytest.approx(0.05)
    assert chunk.latency == pytest.approx(0.042)


def test_both_time_from_start_conventions_give_the_same_schedule():
    from_zero = validator()(message(first=0))
    from_one = validator()(message(first=1))
    np.testing.assert_allclose(from_zero.offsets, from_one.offsets, atol=1e-12)


@pytest.mark.parametrize('msg, reason', [
    (message(points=7), '7 points; expected 8'),
    (message(points=0), '0 points; expected 8'),
    (message(points=0, names=()), 'joint_names'),             # an empty message
    (message(points=1000), '1000 points; expected 8'),
    (message(names=NAMES[:6]), 'joint_names'),
    (message(names=('dy', 'dx') + NAMES[2:]), 'joint_names'),
    (message(value=float('nan')), 'non-finite'),
    (message(value=float('inf')), 'non-finite'),
])
def test_malformed_chunks_are_rejected_with_a_reason(msg, reason):
    with pytest.raises(ChunkRejected, match=reason):
        validator()(msg)


def test_positions_are_checked_in_float32_and_against_the_action_range():
    with pytest.raises(ChunkRejected, match=r'non-finite .*beyond float32.* points \[0, 1'):
        validator()(message(value=1e300))                # finite as float64, inf as float32
    strict = validator(action_limit=1.0)
    with pytest.raises(ChunkRejected, match=r'beyond the action range \+-1.0 in points \[0'):
        strict(message(value=1e30))                       # the 1e30 gripper command
    with pytest.raises(ChunkRejected, match=r'points \[2, 3'):
        strict(message(value=None, gripper=0.5))          # points 2.. have positions k > 1
    chunk = strict(message(value=-1.0, gripper=1.0))
    assert chunk.actions.dtype == np.float32 and np.abs(chunk.actions).max() == 1.0


def test_rejection_names_the_bad_point():
    msg = message()
    with pytest.raises(ChunkRejected, match=r'point 3 has 6 positions; expected 7'):
        validator()(with_positions(msg, 3, msg.positions[3][:6]))
    with pytest.raises(ChunkRejected, match=r'non-finite .* points \[5\]'):
        validator()(with_positions(msg, 5, [0.0] * 6 + [float('-inf')]))


def test_time_from_start_must_increase_and_match_points():
    msg = message()
    flat = ChunkMessage(msg.stamp_ns, msg.joint_names, msg.positions, (0.0,) * 8)
    with pytest.raises(ChunkRejected, match='strictly increasing'):
        validator()(flat)
    short = ChunkMessage(msg.stamp_ns, msg.joint_names, msg.positions, msg.time_from_start[:7])
    with pytest.raises(ChunkRejected, match='7 time_from_start values for 8 points'):
        validator()(short)
    negative = ChunkMessage(msg.stamp_ns, msg.joint_names, msg.positions,
                            tuple(t - 1.0 for t in msg.time_from_start))
    with pytest.raises(ChunkRejected, match='>= 0'):
        validator()(negative)
    decreasing = ChunkMessage(msg.stamp_ns, msg.joint_names, msg.positions,
                              msg.time_from_start[::-1])
    with pytest.raises(ChunkRejected, match='strictly increasing'):
        validator()(decreasing)


def test_any_length_accepted_when_chunk_len_is_zero():
    assert len(validator(chunk_len=0)(message(points=3))) == 3
    single = validator(chunk_len=0)(message(points=1))
    assert single.period == pytest.approx(0.05)


# --- lockstep ---------------------------------------------------------------------------------

def test_lockstep_executes_every_point_of_the_answering_chunk_in_order():
    executor = LockstepExecutor(validator())
    executor.expect(T0)
    assert not executor.offer(message(stamp_ns=T0 - 50 * MS))  # answers an older observation
    assert executor.counters.stale_chunks == 1 and executor.awaiting
    assert executor.offer(message(stamp_ns=T0))
    assert not executor.awaiting and executor.remaining == 8
    firsts = [executor.next_action()[0] for _ in range(8)]
    assert firsts == list(range(8))
    assert executor.remaining == 0
    counters = executor.counters
    assert (counters.steps, counters.held_steps, counters.executed_chunks) == (8, 0, 1)
    assert counters.latencies == [pytest.approx(0.030)]
    with pytest.raises(RuntimeError):
        executor.next_action()


def test_lockstep_rejected_answer_holds_still_for_one_chunk_with_the_current_gripper():
    executor = LockstepExecutor(validator())
    executor.expect(T0)
    executor.offer(message(stamp_ns=T0, gripper=1.0))  # closes the gripper
    while executor.remaining:
        executor.next_action()
    executor.expect(T0 + 1000 * MS)
    with pytest.raises(ChunkRejected, match='7 points'):
        executor.offer(message(stamp_ns=T0 + 1000 * MS, points=7, gripper=-1.0))
    holds = [executor.next_action() for _ in range(executor.remaining)]
    assert len(holds) == 8
    for action in holds:
        np.testing.assert_array_equal(action, hold_action(1.0))
    counters = executor.counters
    assert (counters.rejected_chunks, counters.held_steps, counters.steps) == (1, 8, 16)


def test_lockstep_republished_observation_accepts_an_answer_to_either_stamp_once():
    executor = LockstepExecutor(validator())
    executor.expect(T0)
    executor.expect(T0 + 5000 * MS, new_observation=False)  # republished after a timeout
    assert executor.offer(message(stamp_ns=T0))              # the slow answer to the first
    assert not executor.offer(message(stamp_ns=T0 + 5000 * MS))  # the second answer is stale
    assert executor.counters.stale_chunks == 1 and executor.remaining == 8


def test_lockstep_execution_horizon_executes_the_first_points_and_holds_as_long():
    executor = LockstepExecutor(validator(), horizon=3)
    executor.expect(T0)
    assert executor.offer(message(stamp_ns=T0, gripper=1.0))
    assert [executor.next_action()[0] for _ in range(executor.remaining)] == [0, 1, 2]
    assert executor.counters.superseded_steps == 5
    executor.expect(T0 + 1000 * MS)
    with pytest.raises(ChunkRejected):
        executor.offer(message(stamp_ns=T0 + 1000 * MS, points=7))
    assert executor.remaining == 3      # a rejected answer holds for one horizon, not a chunk
    counters = executor.counters
    assert (counters.rejected_chunks, counters.superseded_steps) == (1, 5)
    with pytest.raises(ValueError, match='horizon'):
        LockstepExecutor(validator(), horizon=-1)


def test_lockstep_temporal_ensemble_averages_the_arm_with_the_previous_chunks_plan():
    executor = LockstepExecutor(validator(), horizon=3, ensemble=True)
    executor.expect(T0)
    assert executor.offer(message(stamp_ns=T0, gripper=1.0))  # points k = 0..7
    first = [executor.next_action() for _ in range(executor.remaining)]
    assert [a[0] for a in first] == [0, 1, 2]                  # nothing planned before it
    executor.expect(T0 + 1000 * MS)
    executor.expect(T0 + 6000 * MS, new_observation=False)   # republished: the sim has not moved
    assert not executor.offer(message(stamp_ns=T0 + 500 * MS))   # stale: changes nothing
    assert executor.offer(message(stamp_ns=T0 + 6000 * MS, value=10.0, gripper=-1.0))
    second = [executor.next_action() for _ in range(executor.remaining)]
    # The previous chunk planned 3, 4, 5 for these steps: the arm gets the means, the gripper
    # the new chunk's command.
    np.testing.assert_allclose([a[:-1] for a in second],
                               [[6.5] * 6, [7.0] * 6, [7.5] * 6])
    assert [a[-1] for a in second] == [-1.0] * 3
    executor.expect(T0 + 2000 * MS)
    with pytest.raises(ChunkRejected):
        executor.offer(message(stamp_ns=T0 + 2000 * MS, points=7))
    for _ in range(executor.remaining):   # the hold
        executor.next_action()
    executor.expect(T0 + 3000 * MS)
    assert executor.offer(message(stamp_ns=T0 + 3000 * MS, value=2.0))
    assert [executor.next_action()[0] for _ in range(3)] == [2.0] * 3  # afresh after the hold


def test_lockstep_without_ensemble_executes_the_new_chunk_unchanged():
    executor = LockstepExecutor(validator(), horizon=3)
    for i, value in enumerate((0.0, 10.0)):
        executor.expect(T0 + i * MS)
        assert executor.offer(message(stamp_ns=T0 + i * MS, value=value))
        assert [executor.next_action()[0] for _ in range(3)] == [value] * 3


# --- real time --------------------------------------------------------------------------------

PERIOD_NS = 50 * MS


def run_ticks(executor, first_tick_ns, count):
    return [executor.action_at(first_tick_ns + i * PERIOD_NS) for i in range(count)]


def test_realtime_holds_until_a_chunk_arrives():
    executor = RealtimeExecutor(validator())
    actions = run_ticks(executor, T0, 3)
    for action in actions:
        np.testing.assert_array_equal(action, hold_action(-1.0))
    assert (executor.counters.held_steps, executor.counters.steps) == (3, 3)


def test_realtime_skips_points_whose_time_passed_and_holds_after_the_chunk():
    executor = RealtimeExecutor(validator())
    # Observation at T0; the chunk arrives 120 ms later; the sim's next tick is at T0 + 150 ms.
    assert executor.offer(message(stamp_ns=T0, received_ns=T0 + 120 * MS))
    assert executor.remaining(T0 + 150 * MS) == 5
    actions = run_ticks(executor, T0 + 150 * MS, 7)
    assert [a[0] for a in actions[:5]] == [3, 4, 5, 6, 7]   # points 0..2 were due before
    for action in actions[5:]:
        np.testing.assert_array_equal(action, hold_action(1.0))  # holds with the last gripper
    counters = executor.counters
    assert (counters.skipped_steps, counters.held_steps, counters.steps) == (3, 2, 7)
    assert counters.latencies == [pytest.approx(0.120)]
    assert executor.remaining(T0 + 500 * MS) == 0


def test_realtime_chunk_that_arrives_after_its_last_point_is_all_skipped():
    executor = RealtimeExecutor(validator())
    executor.offer(message(stamp_ns=T0, received_ns=T0 + 450 * MS))
    run_ticks(executor, T0 + 450 * MS, 2)
    counters = executor.counters
    assert (counters.skipped_steps, counters.held_steps, counters.executed_chunks) == (8, 2, 0)


def test_realtime_newer_chunk_supersedes_and_older_is_stale():
    executor = RealtimeExecutor(validator())
    executor.offer(message(stamp_ns=T0, received_ns=T0 + 10 * MS))
    run_ticks(executor, T0, 3)                           # points 0, 1, 2 of the first chunk
    newer = message(stamp_ns=T0 + 100 * MS, received_ns=T0 + 140 * MS, value=10.0)
    assert executor.offer(newer)
    assert executor.counters.superseded_steps == 5       # points 3..7 will never run
    assert not executor.offer(message(stamp_ns=T0 + 50 * MS))
    assert executor.counters.stale_chunks == 1
    action = executor.action_at(T0 + 150 * MS)           # the newer chunk's point 1
    assert action[0] == 10.0
    assert executor.counters.skipped_steps == 1           # its point 0 (due at T0 + 100 ms)


def test_realtime_chunk_scheduled_from_its_observation_time_on_another_clock():
    executor = RealtimeExecutor(validator())
    late = message(stamp_ns=T0, received_ns=T0 + 2000 * MS)
    executor.offer(late, observed_at_ns=T0 + 2000 * MS)   # e.g. the sim was paused meanwhile
    assert [a[0] for a in run_ticks(executor, T0 + 2000 * MS, 8)] == list(range(8))
    assert executor.counters.skipped_steps == 0
    assert executor.counters.latencies == [pytest.approx(2.0)]


def test_realtime_chunk_period_is_honoured_against_the_sim_period():
    slow = RealtimeExecutor(validator())
    slow.offer(message(stamp_ns=T0, period=0.1, received_ns=T0))   # 10 Hz chunk, 20 Hz sim
    assert [a[0] for a in run_ticks(slow, T0, 6)] == [0, 0, 1, 1, 2, 2]
    fast = RealtimeExecutor(validator())
    fast.offer(message(stamp_ns=T0, period=0.025, received_ns=T0))  # 40 Hz chunk
    assert [a[0] for a in run_ticks(fast, T0, 4)] == [0, 2, 4, 6]
    assert fast.counters.skipped_steps == 3


def test_realtime_rejected_chunk_is_counted_and_the_current_one_continues():
    executor = RealtimeExecutor(validator())
    executor.offer(message(stamp_ns=T0, received_ns=T0))
    executor.action_at(T0)
    with pytest.raises(ChunkRejected):
        executor.offer(message(stamp_ns=T0 + 50 * MS, value=float('nan')))
    assert executor.action_at(T0 + PERIOD_NS)[0] == 1
    assert executor.counters.rejected_chunks == 1


def test_next_due_keeps_the_rate_and_never_catches_up():
    assert next_due(10.0, 10.01, 0.05) == pytest.approx(10.05)   # jitter: schedule kept
    assert next_due(10.0, 10.049, 0.05) == pytest.approx(10.05)
    assert next_due(10.0, 10.2, 0.05) == pytest.approx(10.25)    # after a stall: restart


def test_percentile_summary():
    summary = percentile_summary([0.010, 0.020, 0.030, 0.040])
    assert summary['n'] == 4
    assert summary['p50'] == pytest.approx(25.0) and summary['max'] == pytest.approx(40.0)
    assert percentile_summary([])['p50'] is None
