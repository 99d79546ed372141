"""Lockstep episodes of the sim bridge: the simulated world waits for every chunk.

`LockstepScheduler.run` publishes an observation, waits for the chunk stamped with its stamp,
executes its first `observation_interval` points (all of them with 0), and observes again. No
answer within the bridge's `chunk_timeout`: the same view is republished under a new stamp, and
an answer to either is accepted. A rejected chunk makes the arm hold for one execution horizon
(`LockstepExecutor`). Reproducible: the policy's speed costs no steps, so a late chunk costs only
wall time.

No ROS and no LIBERO here: the bridge hands in its side as an `EpisodeLink` of callables.
"""

from sim_bridge.chunk_executor import LockstepExecutor
from sim_bridge.episode_link import EpisodeLink
from sim_bridge.libero_env import Observation


class LockstepScheduler:
    """One lockstep episode over a `LockstepExecutor`.

    State: `obs` (the observation being answered) and `republished` (observations published
    again for lack of an answer).
    """

    def __init__(self, executor: LockstepExecutor, link: EpisodeLink) -> None:
        self.executor = executor
        self.link = link
        self.obs: Observation | None = None
        self.republished = 0

    def run(self, obs: Observation) -> dict | None:
        """Run the episode from its first observation `obs` until `link.step` says it is over.

        Returns the episode record's extra fields (`republished_observations`), or None if the
        bridge stopped first.
        """
        self.obs = obs
        while True:
            stamp = self.link.now_ns()
            self.executor.expect(stamp)
            self.link.publish(self.obs, stamp)
            if not self.link.await_answer(self.executor.offer, self.republish):
                return None
            done = False
            while self.executor.remaining and not done:
                done = self.link.step(self.executor.next_action())
            self.link.progress(self.executor.counters.steps)
            if done:
                return {'republished_observations': self.republished}
            self.obs = self.link.observe()

    def republish(self) -> None:
        """Publish the current observation again under a new stamp; accept answers to both."""
        self.republished += 1
        stamp = self.link.now_ns()
        self.link.publish(self.obs, stamp)
        self.executor.expect(stamp, new_observation=False)
