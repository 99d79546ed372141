"""Real-time episodes of the sim bridge: one control tick per period on the wall clock.

`RealtimeScheduler.run` schedules, tick by tick (20 Hz on the monotonic clock, paced by
`next_due`: no catching up after a slow tick):

1. the chunks that arrived since the last tick: a chunk answering an observation this episode
   published is handed to the `RealtimeExecutor`, its point 0 due at that observation's tick
   (found by the stamp); any other stamp is stale;
2. whether to observe: when the current chunk has run out (or every `observation_interval`
   ticks), or again after `chunk_timeout` s without an answer to the newest observation;
3. the step: the point of the newest chunk due at this tick, or a hold when nothing is due.

What a late chunk costs: its points are due from its observation's tick, so a chunk arriving
n ticks after its observation finds its first n points past. They are skipped
(`skipped_steps`), and for those n ticks the arm held still (`held_steps`) unless an earlier
chunk still had points; a chunk later than its own length is skipped whole. Only the policy's
latency costs ticks: while the simulator renders (~0.1 s) the tick clock waits with it, and the
world waits for the first chunk of an episode, as a robot waits for its policy to come up.

No ROS and no LIBERO here: the bridge hands in its side as an `EpisodeLink` of callables, so
the schedule runs in tests against a fake simulator and a fake clock.
"""

from collections.abc import Callable
import time

from sim_bridge.chunk_executor import ChunkMessage, ChunkRejected, RealtimeExecutor, next_due
from sim_bridge.episode_link import EpisodeLink
from sim_bridge.libero_env import CONTROL_PERIOD, Observation


class RealtimeScheduler:
    """One realtime episode over a `RealtimeExecutor` (see the module docstring).

    State: `tick` (control ticks executed), `observed_tick` (stamp ns of each published
    observation -> the tick it was taken at), `awaiting` (no chunk has answered the newest
    observation yet), `last_obs_tick` and `last_obs_wall` (tick and monotonic s of the newest
    observation), `republished` (observations published again for lack of an answer).

    period: s per control tick; clock: monotonic seconds (time.monotonic).
    """

    def __init__(self, executor: RealtimeExecutor, link: EpisodeLink, *,
                 observation_interval: int = 0, chunk_timeout: float = 5.0,
                 period: float = CONTROL_PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.executor = executor
        self.link = link
        self.observation_interval = observation_interval
        self.chunk_timeout = chunk_timeout
        self.period = period
        self.period_ns = round(period * 1e9)
        self.clock = clock
        self.obs: Observation | None = None
        self.tick = 0
        self.observed_tick: dict[int, int] = {}
        self.awaiting = False
        self.last_obs_tick = 0
        self.last_obs_wall = 0.0
        self.republished = 0

    def run(self, obs: Observation) -> dict | None:
        """Run the episode from its first observation `obs` until `link.step` says it is over.

        Returns the episode record's extra fields (`republished_observations`,
        `real_time_factor`: simulated s per wall s since the first answer), or None if the
        bridge stopped first.
        """
        self.obs = obs
        # The simulated world waits for the first answer, like a robot for its policy.
        self._publish()
        if not self.link.await_answer(self.offer, self.republish):
            return None
        self.awaiting, self.last_obs_tick, self.last_obs_wall = False, 0, self.clock()
        started = due = self.clock()
        while not self.link.wait(max(due - self.clock(), 0.0)):
            now = self.clock()
            due = next_due(due, now, self.period)
            if self.run_tick(now):
                factor = self.tick * self.period / max(self.clock() - started, 1e-9)
                return {'republished_observations': self.republished,
                        'real_time_factor': round(factor, 3)}
        return None

    def run_tick(self, now: float) -> bool:
        """One control tick at monotonic time `now` (s): take the arrived chunks, observe if
        due, execute the due point. True when the episode is over."""
        self.take_arrived()
        observe, timed_out = self.observation_due(now)
        if observe or timed_out:
            if timed_out:
                self.republished += 1
                self.link.warn(f'no action chunk within {self.chunk_timeout:.1f} s; '
                               'observing again')
            self.obs = self.link.observe()
            self._publish()
            self.awaiting, self.last_obs_tick = True, self.tick
            self.last_obs_wall = self.clock()
        done = self.link.step(self.executor.action_at(self.tick * self.period_ns))
        self.tick += 1
        if self.tick % 20 == 0:
            self.link.progress(self.tick)
        return done

    def offer(self, msg: ChunkMessage) -> bool:
        """Hand a chunk to the executor, scheduled from its observation's tick.

        False for a stamp this episode never published (counted stale); True otherwise, also
        when the chunk was rejected (logged: the arm holds where it has nothing due).
        """
        if msg.stamp_ns not in self.observed_tick:
            self.executor.counters.stale_chunks += 1
            return False
        try:
            self.executor.offer(msg, observed_at_ns=self.observed_tick[msg.stamp_ns]
                                * self.period_ns)
        except ChunkRejected as exc:
            self.link.warn(f'rejected action chunk stamped {msg.stamp_ns * 1e-9:.3f}: {exc}; '
                           'holding the arm')
        return True

    def republish(self) -> None:
        """Publish the current observation again under a new stamp (no answer yet)."""
        self.republished += 1
        self._publish()

    def take_arrived(self) -> None:
        """Offer every chunk that arrived; one answering the newest observation ends the
        wait for it."""
        while (msg := self.link.poll()) is not None:
            if self.offer(msg) and self.observed_tick[msg.stamp_ns] >= self.last_obs_tick:
                self.awaiting = False

    def observation_due(self, now: float) -> tuple[bool, bool]:
        """(observe now, the newest observation timed out) at monotonic time `now` (s)."""
        timed_out = self.awaiting and now - self.last_obs_wall > self.chunk_timeout
        if self.observation_interval:
            observe = self.tick - self.last_obs_tick >= self.observation_interval
        else:
            observe = not self.awaiting and (
                self.executor.remaining(self.tick * self.period_ns) == 0)
        return observe, timed_out

    def _publish(self) -> None:
        """Publish the current observation, stamped now, taken at the current tick."""
        stamp = self.link.now_ns()
        self.observed_tick[stamp] = self.tick
        self.link.publish(self.obs, stamp)
