"""`libero_bridge`: a LIBERO task behind the topics a real arm and camera would offer.

Publishes the upright agent-view image on `camera/image_raw`, the task language on
`instruction`, joint states on `joint_states`, privileged object poses on `sim/object_poses`
(for the scripted expert), its own status on `/diagnostics` and one JSON record per episode on
`episode_result` (also appended to `results_file`). Executes `action_chunk` trajectories.
With `mcap_dir` set, each episode's camera, instruction, joint states, chunks and result are
recorded as one MCAP file, as `ros2 bag` would record them (`episode_recorder`).

The simulator runs in its own thread (a render blocks for ~0.1 s); the ROS executor in the
main thread only converts and queues incoming chunks, so their arrival time is taken when they
arrive, not when the simulator is free. Each episode runs under the scheduler of the `mode`
parameter, which reaches the node only through an `EpisodeLink`:

- lockstep (`lockstep.LockstepScheduler`): observation -> wait for the chunk with its stamp
  (republishing after `chunk_timeout`) -> its first `observation_interval` points (4 by
  default; 0 = all). The policy's speed costs no steps.
- realtime (`realtime.RealtimeScheduler`): 20 Hz ticks on the wall clock, each executing the
  newest chunk's point due at that tick: the policy's latency costs skipped and held steps.
  `real_time_factor` in the episode record says how close to real time the simulator kept
  (< 1 on an overloaded machine, which gives the policy more time per step than a robot).

Message contents are built in `bridge_messages`. Only topics connect the bridge to a policy:
nothing from rsd_core or rsd_ros is imported.
"""

from collections.abc import Callable
from functools import partial
import json
from pathlib import Path
import queue
import threading
import time
import traceback
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_ros import topics
from sim_bridge.bridge_messages import (
    chunk_message,
    diagnostics_msg,
    episode_record,
    image_msg,
    joint_state_msg,
    privileged_state,
)
from sim_bridge.chunk_executor import (
    EXECUTION_HORIZON,
    ChunkMessage,
    ChunkRejected,
    ChunkValidator,
    ExecutorCounters,
    LockstepExecutor,
    RealtimeExecutor,
    chunks_overlap,
)
from sim_bridge.chunk_inbox import ChunkInbox
from sim_bridge.episode_link import EpisodeLink, Offer
from sim_bridge.episode_recorder import EpisodeRecorder, episode_name
from sim_bridge.libero_env import CONTROL_PERIOD, LiberoTask, Observation
from sim_bridge.lockstep import LockstepScheduler
from sim_bridge.realtime import RealtimeScheduler

MODES = ('lockstep', 'realtime')

# name: (default, description); all read-only after start.
PARAMETERS = {
    'suite': ('libero_spatial', 'LIBERO suite name'),
    'task_id': (0, 'task index within the suite'),
    'init_state': (0, 'initial-state index of the first episode; each episode takes the next'),
    'seed': (0, 'seed of the scene randomisation LIBERO does beyond its initial states'),
    'mode': ('lockstep', "'lockstep' (sim waits for each chunk) or 'realtime' (wall clock)"),
    'max_steps': (0, 'control steps per episode; 0 = the suite horizon'),
    'episodes': (1, 'episodes to run before exiting; 0 = run until stopped'),
    'camera_size': (128, 'camera image height = width, px'),
    'results_file': ('', 'append one JSON line per episode here; empty = do not write'),
    'action_names': (list(topics.LIBERO_ACTION_NAMES),
                     'expected joint_names of action_chunk, in order'),
    'chunk_timeout': (5.0, 's without an answer before the observation is republished'),
    'chunk_len': (8, 'expected points per chunk; 0 = any number'),
    'action_limit': (1.0, 'positions beyond +- this (action units) refuse the chunk'),
    'observation_interval': (EXECUTION_HORIZON,
                             'observe every N control steps (lockstep: execute the first N '
                             'points of each chunk); 0 = when the chunk runs out (what the '
                             'scripted expert libero_expert plans for)'),
    'temporal_ensemble': (False, 'lockstep: execute the mean of the new chunk and the previous '
                                 "chunk's points for the same steps (arm only)"),
    'settle_steps': (10, 'no-op steps after loading an initial state (objects drop)'),
    'video_path': ('', 'write the first episode as MP4 (or GIF by extension); empty = none'),
    'frame_id': ('agentview', 'frame_id of the published images'),
    'diagnostics_period': (1.0, 's between /diagnostics messages'),
    'mcap_dir': ('', 'record each episode as <mcap_dir>/<suite>_task<T>_init<I>_ep<E>.mcap; '
                     'empty = do not record'),
}


def write_video(path: str | Path, frames: list[np.ndarray], fps: float) -> Path:
    """Frames [H, W, 3] uint8 -> MP4 (H.264 via imageio-ffmpeg) or GIF (by the extension)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = max(float(fps), 0.5)
    if path.suffix.lower() == '.gif':
        imageio.mimsave(path, frames, duration=1000.0 / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=fps, codec='libx264', quality=8, macro_block_size=8)
    return path


class LiberoBridge(Node):
    """The sim bridge node; `start()` launches the simulator thread, `finished` is set at exit.

    task: an already built `LiberoTask` to drive instead of building one from the parameters
    (its suite, task and camera size win over `suite`, `task_id` and `camera_size`; the caller
    keeps ownership). Lets a process reuse one MuJoCo scene for several bridges.
    """

    def __init__(self, task: LiberoTask | None = None, **kwargs: Any) -> None:
        super().__init__('libero_bridge', **kwargs)
        self._given_task = task
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description,
                                                                      read_only=True))
        self.config = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._check_config()
        self.recorder = EpisodeRecorder(self.config['mcap_dir'])
        self.validator = ChunkValidator(action_names=tuple(self.config['action_names']),
                                        chunk_len=self.config['chunk_len'],
                                        default_period=CONTROL_PERIOD,
                                        action_limit=self.config['action_limit'])

        self.image_pub = self.create_publisher(Image, topics.CAMERA, topics.SENSOR_QOS)
        self.instruction_pub = self.create_publisher(String, topics.INSTRUCTION,
                                                     topics.INSTRUCTION_QOS)
        self.joint_pub = self.create_publisher(JointState, topics.JOINT_STATES,
                                               topics.SENSOR_QOS)
        self.poses_pub = self.create_publisher(String, topics.OBJECT_POSES, topics.POSES_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS,
                                                     topics.STATS_QOS)
        self.result_pub = self.create_publisher(String, topics.EPISODE_RESULT,
                                                topics.RESULT_QOS)
        self.chunk_sub = self.create_subscription(JointTrajectory, topics.ACTION_CHUNK,
                                                  self._on_chunk, topics.CHUNK_QOS)
        self.create_subscription(String, topics.POLICY_STATS, self._on_policy_stats,
                                 topics.STATS_QOS)
        self.create_timer(self.config['diagnostics_period'], self._publish_diagnostics)

        self.finished = threading.Event()
        self.exit_code = 0
        self._stop = threading.Event()
        self._inbox = ChunkInbox()                 # bounded: a flood drops the oldest
        self._lock = threading.Lock()
        self._policy_stats: list[dict] = []
        self._status = {'state': 'loading', 'episode': 0, 'step': 0}
        self._counters = ExecutorCounters()
        self._thread = threading.Thread(target=self._run, name='libero_sim', daemon=True)

    def _check_config(self) -> None:
        """Raise ValueError listing every parameter out of range."""
        config = self.config
        problems = []
        if config['mode'] not in MODES:
            problems.append(f"mode {config['mode']!r}: expected one of {MODES}")
        for name in ('max_steps', 'episodes', 'chunk_len', 'observation_interval',
                     'settle_steps', 'task_id', 'init_state'):
            if config[name] < 0:
                problems.append(f'{name} {config[name]}: expected >= 0')
        if config['camera_size'] < 8:
            problems.append(f"camera_size {config['camera_size']}: expected >= 8 px")
        if config['chunk_timeout'] <= 0 or config['diagnostics_period'] <= 0:
            problems.append('chunk_timeout and diagnostics_period must be > 0 s')
        if len(config['action_names']) != 7:
            problems.append(f"action_names {config['action_names']}: expected 7 names "
                            '(OSC_POSE deltas + gripper)')
        if config['temporal_ensemble'] and not chunks_overlap(config['mode'],
                                                              config['observation_interval']):
            problems.append('temporal_ensemble needs mode lockstep and observation_interval > 0 '
                            '(chunks that overlap)')
        if problems:
            raise ValueError('invalid libero_bridge parameters: ' + '; '.join(problems))

    # --- ROS side (executor thread) -----------------------------------------------------------

    def _now_ns(self) -> int:
        """Now on the node's (ROS) clock, ns: the stamps' clock."""
        return self.get_clock().now().nanoseconds

    def _on_chunk(self, msg: JointTrajectory) -> None:
        """Record and queue the chunk for the simulator thread, timed on arrival."""
        now = self._now_ns()
        self.recorder.write(self.chunk_sub.topic_name, msg, now)
        if self._inbox.put_newest(chunk_message(msg, now)):
            self.get_logger().warning(
                f'{self._inbox.dropped} action chunks dropped unexecuted so far: more than '
                f'{self._inbox.maxsize} arrived while the simulator was busy (oldest dropped)',
                throttle_duration_sec=5.0)

    def _on_policy_stats(self, msg: String) -> None:
        """Keep a JSON-object stats message for the episode record."""
        try:
            stats = json.loads(msg.data)
        except json.JSONDecodeError:
            self.get_logger().warning('policy_stats message is not JSON; ignored')
            return
        if isinstance(stats, dict):
            with self._lock:
                self._policy_stats.append(stats)

    def _publish_diagnostics(self) -> None:
        """The simulator thread's state and the current episode's counters."""
        with self._lock:
            status = dict(self._status)
            counters = self._counters.as_dict()
        array = diagnostics_msg(f'{self.get_name()}: sim', status,
                                {**counters, 'mode': self.config['mode']})
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    # --- simulator thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the simulator thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the simulator thread to stop and wait for it (at most `timeout` s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _set_status(self, **status: Any) -> None:
        """Update what /diagnostics reports (state, episode, step, ...)."""
        with self._lock:
            self._status.update(status)

    def _run(self) -> None:
        """The simulator thread: build the task, wait for a policy, run the episodes."""
        task = self._given_task
        try:
            config = self.config
            if task is None:
                task = LiberoTask(config['suite'], config['task_id'], config['init_state'],
                                  seed=config['seed'], camera_size=config['camera_size'],
                                  settle_steps=config['settle_steps'])
            self._set_status(suite=task.suite, task_id=task.task_id)
            self.get_logger().info(f'{task.suite} task {task.task_id}: "{task.language}" '
                                   f'({config["mode"]})')
            self.instruction_pub.publish(String(data=task.language))
            if not self._wait_for_policy():
                return
            episode = 0
            while not self._stop.is_set() and (config['episodes'] == 0
                                               or episode < config['episodes']):
                result = self._run_episode(task, episode)
                if result is None:
                    break
                self._report(result)
                episode += 1
            self._set_status(state='done')
        except Exception as exc:  # any failure ends the node with an error
            self.exit_code = 1
            self._set_status(state='failed')
            self.get_logger().error(f'simulator thread failed: {type(exc).__name__}: {exc}\n'
                                    f'{traceback.format_exc()}')
        finally:
            self.recorder.abort()   # an episode cut short keeps its .part name
            if task is not None and task is not self._given_task:
                task.close()
            self.finished.set()

    def _wait_for_policy(self) -> bool:
        """Block until something publishes action_chunk; False if stopped first."""
        self._set_status(state='waiting for policy')
        started = time.monotonic()
        next_log = started + 10.0
        while self.chunk_sub.get_publisher_count() == 0:
            if self._stop.wait(0.1):
                return False
            if time.monotonic() > next_log:
                self.get_logger().info(f'waiting for a policy to publish action_chunk '
                                       f'({time.monotonic() - started:.0f} s)')
                next_log += 10.0
        # Give discovery a moment to match the policy's other subscriptions (an observation
        # published before that is lost and costs a chunk_timeout); not every policy listens
        # to all of them, hence the bound.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (
                self.instruction_pub.get_subscription_count() == 0
                or self.image_pub.get_subscription_count()
                + self.poses_pub.get_subscription_count() == 0):
            if self._stop.wait(0.05):
                return False
        return not self._stop.wait(0.2)

    def _poll_inbox(self) -> ChunkMessage | None:
        """The oldest queued chunk, or None if the inbox is empty (no waiting)."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _drain_inbox(self) -> None:
        """Drop every queued chunk (answers to an earlier episode's observations)."""
        while self._poll_inbox() is not None:
            pass

    def _publish_observation(self, task: LiberoTask, obs: Observation, stamp_ns: int,
                             episode: int) -> None:
        """Object poses, joint states, then the image, all with one stamp."""
        state = privileged_state(task, obs, stamp_ns, episode)
        self.poses_pub.publish(String(data=json.dumps(state)))
        self._send(self.joint_pub, joint_state_msg(task, obs.robot, stamp_ns))
        self._send(self.image_pub, image_msg(obs.image, stamp_ns, self.config['frame_id']))

    def _send(self, publisher: Any, msg: Any) -> None:
        """Publish `msg`; record it, sent now, when an episode is being recorded."""
        publisher.publish(msg)
        self.recorder.write(publisher.topic_name, msg, self._now_ns())

    def _await_answer(self, offer: Offer, republish: Callable[[], None]) -> bool:
        """Feed queued chunks to `offer` until it returns True (or raises ChunkRejected, which is
        logged and counts as an answer); republish after `chunk_timeout`. False if stopped."""
        timeout = self.config['chunk_timeout']
        deadline = time.monotonic() + timeout
        attempts = 0
        while not self._stop.is_set():
            try:
                msg = self._inbox.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    attempts += 1
                    self._set_status(state='republishing')
                    self.get_logger().warning(f'no action chunk within {timeout:.1f} s; '
                                              f'republishing the observation ({attempts})')
                    republish()
                    deadline = time.monotonic() + timeout
                continue
            try:
                if offer(msg):
                    self._set_status(state='running')
                    return True
            except ChunkRejected as exc:
                self.get_logger().warning(f'rejected action chunk stamped '
                                          f'{msg.stamp_ns * 1e-9:.3f}: {exc}; holding the arm')
                self._set_status(state='running')
                return True
        return False

    def _run_episode(self, task: LiberoTask, episode: int) -> dict | None:
        """One episode; the result record, or None if stopped."""
        config = self.config
        init_state = (config['init_state'] + episode) % task.num_init_states
        max_steps = config['max_steps'] or task.horizon
        self._drain_inbox()
        obs = task.reset(init_state)
        self.recorder.begin(episode_name(task.suite, task.task_id, init_state, episode))
        self.recorder.write(self.instruction_pub.topic_name, String(data=task.language),
                            self._now_ns())   # the latched instruction in force
        with self._lock:
            self._policy_stats.clear()
            self._status.update(state='running', episode=episode, step=0)
        frames = [] if config['video_path'] and episode == 0 else None
        timing = {'render_s': 0.0, 'renders': 0, 'physics_s': 0.0}
        started = time.monotonic()
        scheduler = self._scheduler(self._episode_link(task, episode, max_steps, frames, timing))
        if frames is not None:
            frames.append(obs.image)
        extra = scheduler.run(obs)
        if extra is None:
            return None
        wall = time.monotonic() - started
        if frames is not None:
            frames.append(task.render())
            path = write_video(config['video_path'], frames,
                               fps=len(frames) / max(task.sim_time, CONTROL_PERIOD))
            self.get_logger().info(f'wrote {len(frames)} frames to {path}')
        with self._lock:
            stats = list(self._policy_stats)
        return episode_record(task, init_state, episode, max_steps, seed=config['seed'],
                              mode=config['mode'], wall_s=wall,
                              counters=scheduler.executor.counters, extra=extra, timing=timing,
                              policy_stats=stats)

    def _episode_link(self, task: LiberoTask, episode: int, max_steps: int,
                      frames: list | None, timing: dict) -> EpisodeLink:
        """What the episode's scheduler may do: publish, observe, step, take chunks, wait."""
        return EpisodeLink(
            now_ns=self._now_ns,
            publish=partial(self._publish_observation, task, episode=episode),
            observe=partial(self._observe, task, frames, timing),
            step=partial(self._step, task, max_steps=max_steps, timing=timing),
            poll=self._poll_inbox, await_answer=self._await_answer, wait=self._stop.wait,
            warn=self.get_logger().warning, progress=lambda steps: self._set_status(step=steps))

    def _scheduler(self, link: EpisodeLink) -> LockstepScheduler | RealtimeScheduler:
        """The configured mode's scheduler over a new executor (its counters go to
        /diagnostics)."""
        if self.config['mode'] == 'lockstep':
            executor = LockstepExecutor(self.validator,
                                        horizon=self.config['observation_interval'],
                                        ensemble=self.config['temporal_ensemble'])
            scheduler = LockstepScheduler(executor, link)
        else:
            scheduler = RealtimeScheduler(
                RealtimeExecutor(self.validator), link,
                observation_interval=self.config['observation_interval'],
                chunk_timeout=self.config['chunk_timeout'])
        self._counters = scheduler.executor.counters
        return scheduler

    def _observe(self, task: LiberoTask, frames: list | None, timing: dict) -> Observation:
        """Render an observation; its time goes to `timing`, its image to `frames` (if any)."""
        t0 = time.perf_counter()
        obs = task.observe()
        timing['render_s'] += time.perf_counter() - t0
        timing['renders'] += 1
        if frames is not None:
            frames.append(obs.image)
        return obs

    def _step(self, task: LiberoTask, action: np.ndarray, max_steps: int, timing: dict) -> bool:
        """One control step; True when the episode is over (success or step limit)."""
        t0 = time.perf_counter()
        result = task.step(action)
        timing['physics_s'] += time.perf_counter() - t0
        return result.success or result.step >= max_steps

    def _report(self, result: dict) -> None:
        """Publish, record (closing the episode's MCAP file), append to `results_file` and log
        one episode record."""
        if self.recorder.path is not None:
            result['mcap_file'] = str(self.recorder.path)
        line = json.dumps(result)
        self._send(self.result_pub, String(data=line))
        self.recorder.finish(result)
        if self.config['results_file']:
            path = Path(self.config['results_file'])
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open('a') as stream:
                stream.write(line + '\n')
        factor = result.get('real_time_factor')
        if factor is not None and factor < 0.8:
            self.get_logger().warning(
                f'the simulator ran at {factor:.2f} x real time (machine too busy): the policy '
                'had more time per control step than it would on a robot')
        latency = result['latency_ms']['p50']
        self.get_logger().info(
            f"episode {result['episode']} init_state {result['init_state']}: "
            f"{'success' if result['success'] else 'failure'} after {result['steps']} steps, "
            f"{result['wall_time_s']:.1f} s, latency p50 "
            f"{'n/a' if latency is None else f'{latency:.1f} ms'}, held "
            f"{result['held_steps']}, skipped {result['skipped_steps']}, rejected "
            f"{result['rejected_chunks']}")


def main(args: list[str] | None = None) -> int:
    """Run the libero_bridge node until its episodes are done; its exit code (2: bad
    parameters)."""
    try:
        with rclpy.init(args=args):
            try:
                node = LiberoBridge()
            except ValueError as exc:
                rclpy.logging.get_logger('libero_bridge').error(str(exc))
                return 2
            node.start()
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                while not node.finished.is_set():
                    executor.spin_once(timeout_sec=0.1)
                # Give the last episode_result a moment to reach late subscribers.
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    executor.spin_once(timeout_sec=0.05)
            except RuntimeError:       # rclpy's RCLError: a signal shut the context down
                if node.context.ok():  # while the executor built its wait set
                    raise
            finally:
                node.stop()
                code = node.exit_code
                node.destroy_node()
            return code
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0


if __name__ == '__main__':
    raise SystemExit(main())
