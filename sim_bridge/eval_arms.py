"""The bridges of `rsd eval-libero`: the requested episodes dealt to the arms, one bridge
process per run, the arms side by side against one policy.

The episodes (tasks x trials; trial i of a task starts from initial state init-state + i) are
dealt to the arms in consecutive blocks of near-equal size (`deal_runs`). Arm k runs its block
in order, one `libero_bridge` process per run (one task, consecutive initial states); with
several arms its bridges live in ROS namespace /arm<k> (`arm_names`), the policy serving
arm0..armN-1; with one arm there is one block, a run per task, on the root namespace. Each
arm's bridges append their episode records to a file of the arm's own; the caller follows
them through `run_arms` and is the one writer of the results file, so the records of arms that
finish together never interleave.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
import json
import logging
from pathlib import Path
import time

from sim_bridge.eval_processes import Child, InfrastructureError

logger = logging.getLogger(__name__)

POLL_PERIOD = 0.5             # s between looks at the processes and the results files
FINISH_WAIT = 30.0            # s a bridge may take to exit after its last episode


@dataclass(frozen=True)
class Run:
    """What one bridge process runs: `episodes` episodes of one task, from `init_state` on."""

    arm: int
    task_id: int
    init_state: int
    episodes: int


def arm_names(arms: int) -> list[str]:
    """The arms' ROS namespaces (relative), as the policy's `arms` parameter lists them."""
    return [f'arm{k}' for k in range(arms)]


def deal_runs(tasks: list[int], trials: int, init_state: int, arms: int) -> list[list[Run]]:
    """The runs of each arm: the episode list dealt in consecutive blocks (the first
    len % arms arms get one episode more). ValueError when there are more arms than
    episodes."""
    episodes = [(task, init_state + i) for task in tasks for i in range(trials)]
    if not 1 <= arms <= len(episodes):
        raise ValueError(f'--arms {arms}: expected 1 to {len(episodes)} (the number of '
                         'episodes requested)')
    dealt, start = [], 0
    for arm in range(arms):
        size = len(episodes) // arms + (arm < len(episodes) % arms)
        runs: list[Run] = []
        for task, init in episodes[start:start + size]:
            if runs and runs[-1].task_id == task:
                runs[-1] = replace(runs[-1], episodes=runs[-1].episodes + 1)
            else:
                runs.append(Run(arm, task, init, 1))
        dealt.append(runs)
        start += size
    return dealt


class ResultsFollower:
    """Reads the complete JSON lines appended to a results file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict]:
        """The JSON records of the lines completed since the last call."""
        if not self.path.exists():
            return []
        with open(self.path) as stream:
            stream.seek(self.offset)
            text = stream.read()
        complete = text[:text.rfind('\n') + 1]
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


BridgeStarter = Callable[[Run, Path], Child]    # (run, results file) -> its started bridge


class ArmRunner:
    """The runs of one arm, one bridge after another, advanced by `poll` (never blocks).

    start_bridge starts a run's bridge writing to `results`; a bridge must finish its first
    episode within startup_timeout s and each further one within episode_timeout s.
    """

    def __init__(self, runs: list[Run], start_bridge: BridgeStarter, results: Path,
                 startup_timeout: float, episode_timeout: float) -> None:
        self.arm = runs[0].arm
        self.pending = list(runs)
        self.follower = ResultsFollower(results)
        self.start_bridge = start_bridge
        self.startup_timeout, self.episode_timeout = startup_timeout, episode_timeout
        self.run: Run | None = None
        self.bridge: Child | None = None
        self.done = 0                        # episodes of the current run finished
        self.deadline = 0.0                  # monotonic s by which the next episode must end
        self.exited_once = False             # the bridge had exited at the last look
        self.finish_by: float | None = None  # after its last episode: exit by then

    @property
    def finished(self) -> bool:
        """Every run has ended."""
        return self.bridge is None and not self.pending

    def poll(self) -> list[dict]:
        """Start the next run's bridge when none runs; the records completed since the last
        call. InfrastructureError when a bridge fails or stalls."""
        now = time.monotonic()
        if self.bridge is None:
            if not self.pending:
                return []
            self.run = self.pending.pop(0)
            self.bridge = self.start_bridge(self.run, self.follower.path)
            self.done, self.exited_once, self.finish_by = 0, False, None
            self.deadline = now + self.startup_timeout
        records = self.follower.new_records()
        if records:
            self.done += len(records)
            self.deadline = now + self.episode_timeout
        if self.done >= self.run.episodes:
            self._finish(now)
        else:
            self._check(now)
        return records

    def _check(self, now: float) -> None:
        """Raise if the bridge exited before its episodes were done (after one more look at
        its results: it may have finished meanwhile) or if no episode ended in time."""
        bridge, run = self.bridge, self.run
        code = bridge.exited()
        if code is not None:
            if not self.exited_once:
                self.exited_once = True
                return
            raise InfrastructureError(
                f'{bridge.name} exited with status {code} after {self.done} of {run.episodes} '
                f'episodes; last lines of {bridge.log}:\n{bridge.tail()}')
        if now > self.deadline:
            raise InfrastructureError(
                f'{bridge.name}: no episode finished in time ({self.done} of {run.episodes} '
                f'done); last lines of {bridge.log}:\n{bridge.tail()}')

    def _finish(self, now: float) -> None:
        """Let the bridge exit on its own (at most FINISH_WAIT s), then stop it; raise if it
        failed."""
        bridge = self.bridge
        if self.finish_by is None:
            self.finish_by = now + FINISH_WAIT
        if bridge.exited() is None and now < self.finish_by:
            return
        if bridge.exited() is None:
            logger.warning('%s still running after its last episode; stopping it', bridge.name)
        code = bridge.stop()
        self.bridge = None
        if code not in (0, None):
            raise InfrastructureError(f'{bridge.name} exited with status {code}; see {bridge.log}')

    def stop(self) -> None:
        """Stop the bridge that runs, if any."""
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None


def run_arms(runners: list[ArmRunner], policy: Child,
             on_record: Callable[[int, dict], None]) -> None:
    """Advance every arm until all runs have ended, handing each new record to
    `on_record(arm, record)`; every bridge is stopped on the way out. InfrastructureError
    when the policy exits or a bridge fails or stalls."""
    try:
        while not all(runner.finished for runner in runners):
            if policy.exited() is not None:
                raise InfrastructureError(
                    f'the policy exited with status {policy.exited()}; last lines of '
                    f'{policy.log}:\n{policy.tail()}')
            for runner in runners:
                for record in runner.poll():
                    on_record(runner.arm, record)
            time.sleep(POLL_PERIOD)
    finally:
        for runner in runners:
            runner.stop()
