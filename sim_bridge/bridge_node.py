"""`libero_bridge`: a LIBERO task behind the topics a real arm and camera would offer.

Publishes the upright agent-view image on `camera/image_raw`, the task language on
`instruction`, joint states on `joint_states`, privileged object poses on `sim/object_poses`
(for the scripted expert), its own status on `/diagnostics` and one JSON record per episode on
`episode_result` (also appended to `results_file`). Executes `action_chunk` trajectories.

The simulator runs in its own thread (a render blocks for ~0.1 s); the ROS executor in the
main thread only converts and queues incoming chunks, so their arrival time is taken when they
arrive, not when the simulator is free. Modes (parameter `mode`):

- lockstep: publish an observation, wait for the chunk stamped with its stamp, execute all its
  steps, observe again. No answer within `chunk_timeout` -> the same view is republished with a
  new stamp (an answer to either is accepted). Reproducible: the policy's speed costs no steps.
- realtime: control ticks at 20 Hz on the wall clock. Each tick executes the point of the
  newest chunk that is due at that tick, counted from the tick of the chunk's observation
  (found by its stamp): points whose time passed while the policy was thinking are skipped
  (delay compensation), and the arm holds when nothing is due. An observation is published
  when the chunk runs out (or every `observation_interval` ticks). Ticks are paced without
  catching up: while the simulator renders (~0.1 s) the simulated world pauses, so the
  camera costs no steps but the policy's latency does; `real_time_factor` in the episode
  record says how close to real time the simulator kept (< 1 on an overloaded machine, which
  gives the policy more time per step than a real robot would). The world also waits for
  the first chunk of an episode, as a robot waits for its policy to come up.

Only topics connect the bridge to a policy: nothing from rsd_core or rsd_ros is imported.
"""

import json
from pathlib import Path
import queue
import threading
import time
import traceback

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from sim_bridge.chunk_executor import (
    ChunkMessage,
    ChunkRejected,
    ChunkValidator,
    Counters,
    LockstepExecutor,
    RealtimeExecutor,
    next_due,
    percentile_summary,
)
from sim_bridge.libero_env import CONTROL_PERIOD, LiberoTask, Observation

DEFAULT_ACTION_NAMES = ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
MODES = ('lockstep', 'realtime')

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                        reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
RESULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
CHUNK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.RELIABLE)
RELIABLE_10 = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE)
POSES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.RELIABLE)

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
    'action_names': (DEFAULT_ACTION_NAMES, 'expected joint_names of action_chunk, in order'),
    'chunk_timeout': (5.0, 's without an answer before the observation is republished'),
    'chunk_len': (8, 'expected points per chunk; 0 = any number'),
    'observation_interval': (0, 'realtime: observe every N ticks; 0 = when the chunk runs out'),
    'settle_steps': (10, 'no-op steps after loading an initial state (objects drop)'),
    'video_path': ('', 'write the first episode as MP4 (or GIF by extension); empty = none'),
    'frame_id': ('agentview', 'frame_id of the published images'),
    'diagnostics_period': (1.0, 's between /diagnostics messages'),
}


def time_msg(stamp_ns: int) -> Time:
    """Nanoseconds -> builtin_interfaces Time."""
    return Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def stamp_ns_of(stamp: Time) -> int:
    """builtin_interfaces Time -> nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def chunk_message(msg: JointTrajectory, received_ns: int) -> ChunkMessage:
    """JointTrajectory -> plain numbers for the executor."""
    return ChunkMessage(
        stamp_ns=stamp_ns_of(msg.header.stamp), joint_names=tuple(msg.joint_names),
        positions=tuple(tuple(float(x) for x in point.positions) for point in msg.points),
        time_from_start=tuple(point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
                              for point in msg.points),
        received_ns=received_ns)


def image_msg(image: np.ndarray, stamp_ns: int, frame_id: str) -> Image:
    """[H, W, 3] uint8 RGB -> sensor_msgs/Image (rgb8, tight rows)."""
    height, width, _ = image.shape
    msg = Image(height=height, width=width, encoding='rgb8', is_bigendian=0, step=width * 3)
    msg.header.stamp = time_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return msg


def pose_list(pos: np.ndarray, quat: np.ndarray) -> list[float]:
    """[x, y, z, qx, qy, qz, qw] rounded to 0.1 mm / 1e-6."""
    return [round(float(v), 6) for v in (*pos, *quat)]


def aggregate_policy_stats(messages: list[dict]) -> dict | None:
    """Count, sums and means of the numeric fields of per-chunk policy stats; the last message."""
    if not messages:
        return None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for message in messages:
        for key, value in message.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    means = {key: sums[key] / counts[key] for key in sums}
    return {'chunks': len(messages), 'sums': sums, 'means': means, 'last': messages[-1]}


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

    def __init__(self, task: LiberoTask | None = None, **kwargs):
        super().__init__('libero_bridge', **kwargs)
        self._given_task = task
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description,
                                                                      read_only=True))
        self.config = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._check_config()
        self.validator = ChunkValidator(action_names=tuple(self.config['action_names']),
                                        chunk_len=self.config['chunk_len'],
                                        default_period=CONTROL_PERIOD)

        self.image_pub = self.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
        self.instruction_pub = self.create_publisher(String, 'instruction', LATCHED_QOS)
        self.joint_pub = self.create_publisher(JointState, 'joint_states', SENSOR_QOS)
        self.poses_pub = self.create_publisher(String, 'sim/object_poses', POSES_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics',
                                                     RELIABLE_10)
        self.result_pub = self.create_publisher(String, 'episode_result', RESULT_QOS)
        self.chunk_sub = self.create_subscription(JointTrajectory, 'action_chunk',
                                                  self._on_chunk, CHUNK_QOS)
        self.create_subscription(String, 'policy_stats', self._on_policy_stats, RELIABLE_10)
        self.create_timer(self.config['diagnostics_period'], self._publish_diagnostics)

        self.finished = threading.Event()
        self.exit_code = 0
        self._stop = threading.Event()
        self._inbox: queue.Queue[ChunkMessage] = queue.Queue()
        self._lock = threading.Lock()
        self._policy_stats: list[dict] = []
        self._status = {'state': 'loading', 'episode': 0, 'step': 0}
        self._counters = Counters()
        self._thread = threading.Thread(target=self._run, name='libero_sim', daemon=True)

    def _check_config(self) -> None:
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
        if problems:
            raise ValueError('invalid libero_bridge parameters: ' + '; '.join(problems))

    # --- ROS side (executor thread) -----------------------------------------------------------

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_chunk(self, msg: JointTrajectory) -> None:
        self._inbox.put(chunk_message(msg, self._now_ns()))

    def _on_policy_stats(self, msg: String) -> None:
        try:
            stats = json.loads(msg.data)
        except json.JSONDecodeError:
            self.get_logger().warning('policy_stats message is not JSON; ignored')
            return
        if isinstance(stats, dict):
            with self._lock:
                self._policy_stats.append(stats)

    def _publish_diagnostics(self) -> None:
        with self._lock:
            status = dict(self._status)
            counters = self._counters.as_dict()
        level = DiagnosticStatus.OK
        if status['state'] in ('waiting for policy', 'republishing'):
            level = DiagnosticStatus.WARN
        elif status['state'] == 'failed':
            level = DiagnosticStatus.ERROR
        values = {**status, **counters, 'mode': self.config['mode']}
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [DiagnosticStatus(
            level=level, name=f'{self.get_name()}: sim', hardware_id='libero_sim',
            message=status['state'],
            values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])]
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

    def _set_status(self, **status) -> None:
        with self._lock:
            self._status.update(status)

    def _run(self) -> None:
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

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                return

    def _publish_observation(self, task: LiberoTask, obs: Observation, stamp_ns: int,
                             episode: int) -> None:
        """Object poses, joint states, then the image, all with one stamp."""
        robot = obs.robot
        stamp = time_msg(stamp_ns)
        poses = {
            'stamp': {'sec': stamp.sec, 'nanosec': stamp.nanosec},
            'suite': task.suite, 'task_id': task.task_id, 'task': task.task_name,
            'language': task.language, 'init_state': task.init_state, 'episode': episode,
            'step': obs.step,
            'objects': {name: pose_list(pos, quat)
                        for name, (pos, quat) in task.object_poses().items()},
            'eef_pos': [round(float(v), 6) for v in robot.eef_pos],
            'eef_quat': [round(float(v), 6) for v in robot.eef_quat],
            'gripper_qpos': [round(float(v), 6) for v in robot.gripper_qpos],
            'gripper_command': task.last_gripper,
            'joint_pos': [round(float(v), 6) for v in robot.joint_pos],
        }
        self.poses_pub.publish(String(data=json.dumps(poses)))
        joints = JointState(name=task.joint_names + task.gripper_joint_names,
                            position=[float(v) for v in (*robot.joint_pos, *robot.gripper_qpos)],
                            velocity=[float(v) for v in robot.joint_vel] + [0.0, 0.0])
        joints.header.stamp = stamp
        self.joint_pub.publish(joints)
        self.image_pub.publish(image_msg(obs.image, stamp_ns, self.config['frame_id']))

    def _await_answer(self, offer, republish) -> bool:
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
        with self._lock:
            self._policy_stats.clear()
            self._status.update(state='running', episode=episode, step=0)
        frames = [] if config['video_path'] and episode == 0 else None
        timing = {'render_s': 0.0, 'renders': 0, 'physics_s': 0.0}
        started = time.monotonic()
        if config['mode'] == 'lockstep':
            counters, extra = self._lockstep(task, obs, episode, max_steps, frames, timing)
        else:
            counters, extra = self._realtime(task, obs, episode, max_steps, frames, timing)
        if counters is None:
            return None
        wall = time.monotonic() - started
        if frames is not None:
            frames.append(task.render())
            path = write_video(config['video_path'], frames,
                               fps=len(frames) / max(task.sim_time, CONTROL_PERIOD))
            self.get_logger().info(f'wrote {len(frames)} frames to {path}')
        with self._lock:
            stats = list(self._policy_stats)
        return {
            'suite': task.suite, 'task_id': task.task_id, 'task': task.task_name,
            'instruction': task.language, 'init_state': init_state, 'episode': episode,
            'seed': config['seed'], 'mode': config['mode'], 'success': task.success,
            'max_steps': max_steps, 'sim_time_s': round(task.sim_time, 3),
            'wall_time_s': round(wall, 3),
            'latency_ms': percentile_summary(counters.latencies),
            'latencies_ms': [round(v * 1e3, 3) for v in counters.latencies],
            **counters.as_dict(), **extra,   # steps, held_steps, skipped_steps, ...
            'observations': timing['renders'] + 1,
            'render_ms_mean': round(1e3 * timing['render_s'] / max(timing['renders'], 1), 3),
            'physics_ms_mean': round(1e3 * timing['physics_s'] / max(task.steps, 1), 3),
            'policy_stats': aggregate_policy_stats(stats),
            'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        }

    def _observe(self, task: LiberoTask, frames: list | None, timing: dict) -> Observation:
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

    def _lockstep(self, task, obs, episode, max_steps, frames, timing):
        executor = LockstepExecutor(self.validator)
        self._counters = executor.counters
        republished = 0
        if frames is not None:
            frames.append(obs.image)

        def republish():
            nonlocal republished
            republished += 1
            stamp = self._now_ns()
            self._publish_observation(task, obs, stamp, episode)
            executor.expect(stamp, new_observation=False)

        while True:
            stamp = self._now_ns()
            executor.expect(stamp)
            self._publish_observation(task, obs, stamp, episode)
            if not self._await_answer(executor.offer, republish):
                return None, {}
            done = False
            while executor.remaining and not done:
                done = self._step(task, executor.next_action(), max_steps, timing)
            self._set_status(step=task.steps)
            if done:
                return executor.counters, {'republished_observations': republished}
            obs = self._observe(task, frames, timing)

    def _realtime(self, task, obs, episode, max_steps, frames, timing):
        executor = RealtimeExecutor(self.validator)
        self._counters = executor.counters
        period_ns = round(CONTROL_PERIOD * 1e9)
        observed_tick: dict[int, int] = {}   # stamp of a published observation -> its tick
        republished = 0
        if frames is not None:
            frames.append(obs.image)

        def publish(tick: int) -> int:
            stamp = self._now_ns()
            observed_tick[stamp] = tick
            self._publish_observation(task, obs, stamp, episode)
            return stamp

        def offer(msg: ChunkMessage) -> bool:
            """Hand a chunk to the executor, scheduled from its observation's tick."""
            if msg.stamp_ns not in observed_tick:
                executor.counters.stale_chunks += 1
                return False
            try:
                executor.offer(msg, observed_at_ns=observed_tick[msg.stamp_ns] * period_ns)
            except ChunkRejected as exc:
                self.get_logger().warning(f'rejected action chunk stamped '
                                          f'{msg.stamp_ns * 1e-9:.3f}: {exc}; holding the arm')
            return True

        def republish():
            nonlocal republished
            republished += 1
            publish(0)

        # The simulated world waits for the first answer, like a robot for its policy.
        last_stamp = publish(0)
        if not self._await_answer(offer, republish):
            return None, {}
        interval = self.config['observation_interval']
        timeout = self.config['chunk_timeout']
        awaiting, last_obs_tick, last_obs_wall = False, 0, time.monotonic()
        started = due = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            now = time.monotonic()
            due = next_due(due, now, CONTROL_PERIOD)
            while True:
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if offer(msg) and observed_tick[msg.stamp_ns] >= observed_tick[last_stamp]:
                    awaiting = False
            timed_out = awaiting and now - last_obs_wall > timeout
            if interval:
                observe = tick - last_obs_tick >= interval
            else:
                observe = not awaiting and executor.remaining(tick * period_ns) == 0
            if observe or timed_out:
                if timed_out:
                    republished += 1
                    self.get_logger().warning(f'no action chunk within {timeout:.1f} s; '
                                              'observing again')
                obs = self._observe(task, frames, timing)
                last_stamp = publish(tick)
                awaiting, last_obs_tick, last_obs_wall = True, tick, time.monotonic()
            done = self._step(task, executor.action_at(tick * period_ns), max_steps, timing)
            tick += 1
            if tick % 20 == 0:
                self._set_status(step=task.steps)
            if done:
                factor = task.sim_time / max(time.monotonic() - started, 1e-9)
                return executor.counters, {'republished_observations': republished,
                                           'real_time_factor': round(factor, 3)}
        return None, {}

    def _report(self, result: dict) -> None:
        line = json.dumps(result)
        self.result_pub.publish(String(data=line))
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
