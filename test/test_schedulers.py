"""Lockstep and realtime episode schedules against a fake bridge: no ROS, no LIBERO, no sleep.

`FakeBridge` plays the simulator, the policy and the clock behind an `EpisodeLink`: every
published observation is answered `latency` s (fake clock) later with an 8-point chunk, a
render takes `render` s, and the episode ends after `steps` control steps.
"""

from dataclasses import replace

import numpy as np
import pytest

from sim_bridge.chunk_executor import (
    ChunkMessage,
    ChunkValidator,
    LockstepExecutor,
    RealtimeExecutor,
)
from sim_bridge.episode_link import EpisodeLink
from sim_bridge.lockstep import LockstepScheduler
from sim_bridge.realtime import RealtimeScheduler

NAMES = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
PERIOD = 0.05  # s per control step
T0 = 1_700_000_000 * 1_000_000_000  # ROS time of the fake clock's zero, ns


def chunk(stamp_ns, names=NAMES, points=8):
    """Point k has positions [k + 1, ..., k + 1, 1.0] (a hold is all 0 but the gripper) and is
    due at (k + 1) periods."""
    return ChunkMessage(stamp_ns=stamp_ns, joint_names=tuple(names),
                        positions=tuple((k + 1.0,) * 6 + (1.0,) for k in range(points)),
                        time_from_start=tuple((k + 1) * PERIOD for k in range(points)))


class FakeBridge:
    """The bridge side of one episode with a scripted policy. `answer(index, stamp_ns)`: the
    chunk answering the index-th published observation, or None for no answer."""

    def __init__(self, steps=40, latency=0.0, render=0.0, timeout=5.0, stopped=False,
                 answer=lambda index, stamp_ns: chunk(stamp_ns)):
        self.steps, self.latency, self.render, self.timeout = steps, latency, render, timeout
        self.answer, self.stopped = answer, stopped
        self.clock = 0.0
        self.published, self.actions, self.warnings, self.progress = [], [], [], []
        self.pending = []   # (available at s, chunk), in order
        self.renders = 0

    def now_ns(self):
        return T0 + round(self.clock * 1e9)

    def publish(self, obs, stamp_ns):
        reply = self.answer(len(self.published), stamp_ns)
        self.published.append((obs, stamp_ns))
        if reply is not None:
            self.pending.append((self.clock + self.latency, reply))

    def observe(self):
        self.clock += self.render
        self.renders += 1
        return f'obs {self.renders}'

    def step(self, action):
        self.actions.append(np.asarray(action))
        return len(self.actions) >= self.steps

    def poll(self):
        if self.pending and self.pending[0][0] <= self.clock + 1e-9:
            return replace(self.pending.pop(0)[1], received_ns=self.now_ns())
        return None

    def await_answer(self, offer, republish):
        deadline = self.clock + self.timeout
        while not self.stopped:
            msg = self.poll()
            if msg is None:
                self.wait(0.05)
                if self.clock > deadline:
                    republish()
                    deadline = self.clock + self.timeout
            elif offer(msg):
                return True
        return False

    def wait(self, seconds):
        self.clock += seconds
        return self.stopped

    def link(self):
        return EpisodeLink(now_ns=self.now_ns, publish=self.publish, observe=self.observe,
                           step=self.step, poll=self.poll, await_answer=self.await_answer,
                           wait=self.wait, warn=self.warnings.append,
                           progress=self.progress.append)


def realtime(bridge, **kwargs):
    executor = RealtimeExecutor(ChunkValidator(action_names=NAMES, default_period=PERIOD,
                                               action_limit=100.0))
    scheduler = RealtimeScheduler(executor, bridge.link(), period=PERIOD,
                                  clock=lambda: bridge.clock, **kwargs)
    return scheduler, executor.counters


def lockstep(bridge, horizon=0):
    executor = LockstepExecutor(ChunkValidator(action_names=NAMES, default_period=PERIOD,
                                               action_limit=100.0), horizon=horizon)
    return LockstepScheduler(executor, bridge.link()), executor.counters


# --- realtime ---------------------------------------------------------------------------------

def test_realtime_late_chunk_costs_as_many_held_steps_as_skipped_points():
    bridge = FakeBridge(latency=0.12)              # answers arrive 3 ticks after the image
    scheduler, counters = realtime(bridge)
    extra = scheduler.run('obs 0')
    # The world waits for the first chunk; each later one is observed when the previous runs
    # out and finds its first 3 points past: 3 held ticks, 3 skipped points, 5 executed.
    assert (counters.steps, counters.executed_chunks) == (40, 5)
    assert (counters.held_steps, counters.skipped_steps, counters.superseded_steps) == (12, 12, 0)
    assert counters.latencies == pytest.approx([0.15] * 5)
    assert [obs for obs, _ in bridge.published] == ['obs 0', 'obs 1', 'obs 2', 'obs 3', 'obs 4']
    executed = [a[0] for a in bridge.actions if a[0] != 0.0]   # point k moves by k + 1
    assert executed == [1, 2, 3, 4, 5, 6, 7, 8] + [4, 5, 6, 7, 8] * 4
    assert bridge.progress == [20, 40]
    assert extra == {'republished_observations': 0,
                     'real_time_factor': round(40 * PERIOD / (39 * PERIOD), 3)}


def test_realtime_render_time_pauses_the_world():
    instant, rendering = FakeBridge(render=0.0), FakeBridge(render=0.12)   # > 1 period
    realtime(instant)[0].run('obs 0')
    realtime(rendering)[0].run('obs 0')
    # Same steps (each chunk: 1 held tick, 1 skipped point); each of the 4 renders only made
    # the wall clock wait for it, less the period the tick would have waited anyway.
    assert [a.tolist() for a in rendering.actions] == [a.tolist() for a in instant.actions]
    assert rendering.renders == 4
    assert rendering.clock == pytest.approx(instant.clock + 4 * (0.12 - PERIOD))


def test_realtime_observes_again_after_chunk_timeout():
    bridge = FakeBridge(answer=lambda index, stamp: None if index == 1 else chunk(stamp))
    scheduler, counters = realtime(bridge, chunk_timeout=0.52)
    extra = scheduler.run('obs 0')
    assert extra['republished_observations'] == 1
    assert bridge.warnings == ['no action chunk within 0.5 s; observing again']
    stamps = [stamp for _, stamp in bridge.published]
    assert (stamps[2] - stamps[1]) * 1e-9 == pytest.approx(0.55)   # first tick after 0.52 s
    assert counters.held_steps >= 12


def test_realtime_observation_interval_observes_every_n_ticks():
    bridge = FakeBridge(steps=24)
    scheduler, _ = realtime(bridge, observation_interval=4)
    scheduler.run('obs 0')
    ticks = [scheduler.observed_tick[stamp] for _, stamp in bridge.published]
    assert ticks == [0, 4, 8, 12, 16, 20]


def test_realtime_offer_ignores_unknown_stamps_and_survives_rejected_chunks():
    bridge = FakeBridge()
    scheduler, counters = realtime(bridge)
    scheduler.observed_tick[T0] = 0
    assert scheduler.offer(chunk(T0 + 1)) is False and counters.stale_chunks == 1
    assert scheduler.offer(chunk(T0, names=NAMES[::-1])) is True
    assert counters.rejected_chunks == 1
    assert bridge.warnings[0].startswith('rejected action chunk stamped 1700000000.000: ')


def test_realtime_first_observation_is_republished_until_answered():
    bridge = FakeBridge(answer=lambda index, stamp: None if index < 2 else chunk(stamp),
                        timeout=1.0, steps=8)
    scheduler, counters = realtime(bridge)
    extra = scheduler.run('obs 0')
    assert [obs for obs, _ in bridge.published] == ['obs 0'] * 3
    assert extra['republished_observations'] == 2
    assert {scheduler.observed_tick[stamp] for _, stamp in bridge.published} == {0}
    assert (counters.steps, counters.held_steps) == (8, 0)


def test_realtime_stops_when_the_bridge_stops():
    scheduler, _ = realtime(FakeBridge(stopped=True))
    assert scheduler.run('obs 0') is None


# --- lockstep ---------------------------------------------------------------------------------

def test_lockstep_executes_every_point_whatever_the_latency():
    bridge = FakeBridge(steps=16, latency=0.3)
    scheduler, counters = lockstep(bridge)
    assert scheduler.run('obs 0') == {'republished_observations': 0}
    assert (counters.steps, counters.executed_chunks, counters.held_steps) == (16, 2, 0)
    assert [a[0] for a in bridge.actions] == list(range(1, 9)) * 2
    assert [obs for obs, _ in bridge.published] == ['obs 0', 'obs 1']
    assert bridge.progress == [8, 16]


def test_lockstep_execution_horizon_observes_after_that_many_points():
    bridge = FakeBridge(steps=10, latency=0.3)
    scheduler, counters = lockstep(bridge, horizon=4)
    scheduler.run('obs 0')
    assert [a[0] for a in bridge.actions] == [1, 2, 3, 4] * 2 + [1, 2]
    assert [obs for obs, _ in bridge.published] == ['obs 0', 'obs 1', 'obs 2']
    assert (counters.executed_chunks, counters.superseded_steps) == (3, 12)
    assert bridge.progress == [4, 8, 10]


def test_lockstep_republished_observation_accepts_the_answer_to_its_new_stamp():
    bridge = FakeBridge(steps=8, timeout=1.0,
                        answer=lambda index, stamp: None if index == 0 else chunk(stamp))
    scheduler, counters = lockstep(bridge)
    assert scheduler.run('obs 0') == {'republished_observations': 1}
    assert [obs for obs, _ in bridge.published] == ['obs 0', 'obs 0']
    assert (counters.steps, counters.executed_chunks, counters.stale_chunks) == (8, 1, 0)


def test_lockstep_stops_when_the_bridge_stops():
    scheduler, _ = lockstep(FakeBridge(stopped=True))
    assert scheduler.run('obs 0') is None
