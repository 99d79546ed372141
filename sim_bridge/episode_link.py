"""`EpisodeLink`: the bridge's side of one episode, as the episode schedulers call it.

`LockstepScheduler` and `RealtimeScheduler` decide when to observe, which chunk answers which
observation and what each control step executes; everything they touch outside themselves
(the ROS clock, the publishers, the simulator, the chunk inbox, the stop flag, the log) comes
through these callables. The node builds one per episode; tests build one over a fake
simulator, so the schedules run without ROS or LIBERO.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim_bridge.chunk_executor import ChunkMessage
from sim_bridge.libero_env import Observation

# Offer a chunk; True when it answered the awaited observation. May raise ChunkRejected.
Offer = Callable[[ChunkMessage], bool]


@dataclass(frozen=True)
class EpisodeLink:
    """Callables of one episode, all called from the simulator thread."""
    now_ns: Callable[[], int]                          # ROS clock, ns: observation stamps
    publish: Callable[[Observation, int], None]        # publish `obs` stamped `stamp_ns`
    observe: Callable[[], Observation]                 # render the scene now (~0.1 s)
    step: Callable[[np.ndarray], bool]                 # one control step with an action [7];
                                                       # True when the episode is over
    poll: Callable[[], ChunkMessage | None]            # the next arrived chunk, no waiting
    await_answer: Callable[[Offer, Callable[[], None]], bool]   # block until `offer` takes
                                                       # a chunk, calling the second
                                                       # callable (republish) on timeouts;
                                                       # False if the bridge stopped
    wait: Callable[[float], bool]                      # sleep s; True if the bridge stopped
    warn: Callable[[str], None]                        # log a warning
    progress: Callable[[int], None]                    # control steps executed so far
