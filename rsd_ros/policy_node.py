"""The `rsd_policy` node: camera image + instruction -> action chunk (JointTrajectory).

Topics (relative names), QoS and parameters are those of docs/ARCHITECTURE.md.

Threads. Subscriptions, parameter services and the diagnostics timer run on the executor that
spins the node (a SingleThreadedExecutor in `main`). Inference runs on one dedicated worker
thread that the image callback hands the newest frame to through a one-slot mailbox guarded by
a `threading.Condition`. Chosen over a timer in a MutuallyExclusiveCallbackGroup on a
MultiThreadedExecutor because:
- the worker wakes the moment a frame (or the first instruction) arrives: no timer period adds
  to the camera-to-action latency and nothing polls on an idle 2-core machine;
- a chunk takes 0.1-10 s and holds an executor thread all that time; with a thread of its own,
  the node behaves the same whatever executor it is composed into, and the callbacks stay
  short (store the frame, count, notify);
- rclpy's MultiThreadedExecutor adds Python-side scheduling work on every callback; the
  mailbox is a few lines whose behaviour (newest wins, replaced frames counted) is explicit.
The price is an explicit lifetime: `destroy_node` stops and joins the worker (`main` calls it
even when a signal ended the spin, since rclpy's SIGINT/SIGTERM handler shuts the context
down without destroying nodes). Publishing is done under the mailbox lock after checking that
the node is stopping neither by `destroy_node` nor by a context shutdown, so a chunk that
finishes during shutdown is discarded instead of racing the destruction of the publishers.

Frames. The image callback only validates the message header fields (O(1)) and stores it; a
frame replaced before the worker took it is counted as dropped. The worker refuses frames older
than `max_image_age` (now - header.stamp, counted stale), converts the pixels (cv_bridge, see
image_conversion), runs the engine with the instruction in force at that moment (the latest
valid one received; until the first one arrives the node waits and says so once), clips to the
action limits and publishes the chunk stamped with the image's stamp, then one JSON line on
`policy_stats`. A model that takes proprioception also gets the newest `joint_states` message
(subscribed only then), its positions picked by the model's joint names; without a usable one
(none yet, a joint missing, older than the image by more than `max_image_age`) the frame is
counted as `no_state` and skipped. Bad input (image or instruction) is logged once per distinct
problem and counted; an invalid instruction (empty, whitespace, not UTF-8) does not replace the
one in force. An engine exception is logged once per distinct error with its context, turns the
diagnostics to ERROR until a chunk succeeds, and the next good frame is processed.
"""

from dataclasses import asdict, dataclass, replace
import math
import re
import threading
import traceback

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_core.acceptance import MODES
from rsd_core.bundle import DEFAULT_ACTION_NAMES
from rsd_core.engine import RSDEngine
from rsd_core.main_model import DTYPES
from rsd_core.stats import StatsAggregator
from rsd_ros.image_conversion import ImageConversionError, check_image, imgmsg_to_rgb
from rsd_ros.messages import (
    Counters,
    chunk_to_trajectory,
    diagnostic_array,
    inference_status,
    joint_state_vector,
    mode_name,
    stats_json,
    status_level,
    status_values,
)

ACTION_DIM = len(DEFAULT_ACTION_NAMES)
DEVICE_PATTERN = re.compile(r'cpu|cuda(:\d+)?')
RUNTIME_ENGINE_PARAMETERS = ('use_draft', 'adaptive_proposals', 'acceptance', 'tolerance')

INSTRUCTION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
CHUNK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
STATS_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass(frozen=True)
class Settings:
    """The run-time parameters, one immutable snapshot (the worker reads one per frame)."""

    use_draft: bool
    adaptive_proposals: bool
    acceptance: str
    tolerance: tuple[float, ...]          # action units, one per dim or one for all
    control_period: float                 # s
    action_names: tuple[str, ...]
    frame_id: str
    max_image_age: float                  # s, 0 = no limit
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    diagnostics_period: float             # s
    hardware_id: str
    stats_window: int                     # chunks


def _descriptor(kind: int, description: str, read_only: bool = False,
                constraints: str = '', floats: tuple[float, float] | None = None,
                ints: tuple[int, int] | None = None) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(type=kind, description=description, read_only=read_only,
                                     additional_constraints=constraints)
    if floats:
        descriptor.floating_point_range = [FloatingPointRange(from_value=floats[0],
                                                              to_value=floats[1])]
    if ints:
        descriptor.integer_range = [IntegerRange(from_value=ints[0], to_value=ints[1], step=1)]
    return descriptor


P = ParameterType
PARAMETERS = {
    'model_dir': ('', _descriptor(
        P.PARAMETER_STRING, 'main model bundle directory', read_only=True,
        constraints="'' = the built-in default bundle ($RSD_MODEL_DIR, the installed share "
                    'directory, or <repo>/models/default)')),
    'draft_dir': ('default', _descriptor(
        P.PARAMETER_STRING, 'draft model directory', read_only=True,
        constraints="'default' = the bundle's draft/ if present, '' = no draft")),
    'device': ('cpu', _descriptor(P.PARAMETER_STRING, 'torch device', read_only=True,
                                  constraints="'cpu', 'cuda' or 'cuda:N'")),
    'dtype': ('float32', _descriptor(P.PARAMETER_STRING, 'model dtype', read_only=True,
                                     constraints='one of ' + ', '.join(DTYPES))),
    'use_draft': (True, _descriptor(
        P.PARAMETER_BOOL, 'let the draft propose layers (K chosen per chunk from measured '
        'acceptance and costs; false = never)', constraints='true needs a loaded draft')),
    'adaptive_proposals': (True, _descriptor(
        P.PARAMETER_BOOL, 'choose the number of draft proposals per chunk (0..K) from measured '
        'acceptance and costs; false = always K')),
    'acceptance': ('exact', _descriptor(
        P.PARAMETER_STRING, 'decoding mode: exact (= main-only actions), tolerance (draft '
        "layers within tolerance of the main's), bounded (certified depth: within tolerance "
        'of main-only in every action value)', constraints='one of ' + ', '.join(MODES))),
    'tolerance': ([0.02], _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'bound on the change of any action value in tolerance and '
        'bounded modes, action units', constraints=f'1 value (all dims) or {ACTION_DIM}, '
        'finite, >= 0')),
    'control_period': (0.05, _descriptor(P.PARAMETER_DOUBLE, 'duration of one chunk step, s',
                                         floats=(0.001, 10.0))),
    'action_names': (list(DEFAULT_ACTION_NAMES), _descriptor(
        P.PARAMETER_STRING_ARRAY, 'action dimension names (JointTrajectory.joint_names)',
        constraints=f'{ACTION_DIM} non-empty distinct names')),
    'frame_id': ('base_link', _descriptor(P.PARAMETER_STRING, 'header.frame_id of action_chunk')),
    'max_image_age': (0.5, _descriptor(
        P.PARAMETER_DOUBLE, 'images older than this (now - header.stamp, s) are not acted on',
        constraints='0 = no limit', floats=(0.0, 3600.0))),
    'action_low': ([-1.0] * ACTION_DIM, _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'lower action limits, action units (clipped to)',
        constraints=f'{ACTION_DIM} finite values, <= action_high')),
    'action_high': ([1.0] * ACTION_DIM, _descriptor(
        P.PARAMETER_DOUBLE_ARRAY, 'upper action limits, action units (clipped to)',
        constraints=f'{ACTION_DIM} finite values, >= action_low')),
    'diagnostics_period': (1.0, _descriptor(P.PARAMETER_DOUBLE, '/diagnostics period, s',
                                            floats=(0.05, 60.0))),
    'hardware_id': ('', _descriptor(P.PARAMETER_STRING, 'DiagnosticStatus.hardware_id',
                                    constraints="'' = the device")),
    'stats_window': (100, _descriptor(P.PARAMETER_INTEGER,
                                      'chunks in the diagnostics latency/acceptance window',
                                      ints=(1, 100_000))),
}


def parameter_problem(name: str, value, current: dict) -> str | None:
    """Why `value` is not acceptable for parameter `name` (None if it is).

    current: the values in force (or being set together) of the other parameters.
    """
    if name == 'device' and not DEVICE_PATTERN.fullmatch(value):
        return f"device {value!r}: expected 'cpu', 'cuda' or 'cuda:N'"
    if name == 'dtype' and value not in DTYPES:
        return f'dtype {value!r}: expected one of {", ".join(DTYPES)}'
    if name == 'acceptance' and value not in MODES:
        return f'acceptance {value!r}: expected one of {", ".join(MODES)}'
    if name == 'tolerance':
        if len(value) not in (1, ACTION_DIM):
            return f'tolerance has {len(value)} values; expected 1 (all dims) or {ACTION_DIM}'
        if not all(map(math.isfinite, value)) or min(value) < 0:
            return f'tolerance {list(value)}: expected finite values >= 0 (action units)'
    if name == 'action_names':
        if len(value) != ACTION_DIM:
            return f'action_names has {len(value)} names; expected {ACTION_DIM}'
        if not all(n.strip() for n in value) or len(set(value)) != len(value):
            return f'action_names {list(value)}: expected non-empty, distinct names'
    if name in ('action_low', 'action_high'):
        if len(value) != ACTION_DIM or not all(map(math.isfinite, value)):
            return f'{name} {list(value)}: expected {ACTION_DIM} finite values'
        low, high = (value, current.get('action_high', value)) if name == 'action_low' else (
            current.get('action_low', value), value)
        if len(low) == len(high) and any(lo > hi for lo, hi in zip(low, high, strict=True)):
            return f'action_low {list(low)} exceeds action_high {list(high)} in some dimension'
    return None


def instruction_problem(text: str) -> str | None:
    """Why an instruction cannot be used (None if it can)."""
    if not text.strip():
        return f'empty instruction {text!r}; expected a task description'
    if '\ufffd' in text:
        return f'instruction is not valid UTF-8 (decoded with replacement characters): {text!r}'
    return None


class PolicyNode(Node):
    """Subscribes camera/image_raw + instruction, publishes action_chunk, policy_stats and
    /diagnostics. `node_kwargs` go to rclpy's Node (context, parameter_overrides, ...)."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('rsd_policy', **node_kwargs)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.declare_parameters('', [(name, default, descriptor)
                                     for name, (default, descriptor) in PARAMETERS.items()])
        self._settings = self._read_settings()
        self._engine = self._load_engine()
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._cond = threading.Condition()      # guards everything below up to the worker
        self._pending: tuple[Image, int] | None = None   # (newest image, receive time ns)
        self._joints: JointState | None = None           # newest joint state
        self._instruction: str | None = None
        self._counters = Counters()
        self._reported = Counters()
        self._error: str | None = None
        self._stopping = False
        self._logged: set[str] = set()
        self._said_waiting = False
        self._aggregator = StatsAggregator(self._settings.stats_window)
        self._latencies: list[float] = []

        self._chunk_pub = self.create_publisher(JointTrajectory, 'action_chunk', CHUNK_QOS)
        self._stats_pub = self.create_publisher(String, 'policy_stats', STATS_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', STATS_QOS)
        self._image_sub = self.create_subscription(Image, 'camera/image_raw', self._on_image,
                                                   qos_profile_sensor_data)
        self._instruction_sub = self.create_subscription(String, 'instruction',
                                                         self._on_instruction, INSTRUCTION_QOS)
        self._joints_sub = None
        if self._engine.proprio_names:      # the model takes proprioception
            self._joints_sub = self.create_subscription(JointState, 'joint_states',
                                                        self._on_joints, qos_profile_sensor_data)
        self._diag_timer = self.create_timer(self._settings.diagnostics_period,
                                             self._publish_diagnostics)
        self._worker = threading.Thread(target=self._run_worker, name='rsd_policy_inference',
                                        daemon=True)
        self._worker.start()
        state = f' + {self._joints_sub.topic_name}' if self._joints_sub else ''
        self.get_logger().info(
            f'ready: {self._image_sub.topic_name} + {self._instruction_sub.topic_name}{state} -> '
            f'{self._chunk_pub.topic_name} (draft: {"yes" if self._engine.draft else "no"}, '
            f'use_draft={self._engine.config.use_draft}, '
            f'acceptance={self._settings.acceptance})')

    # ------------------------------------------------------------------ parameters

    def _values(self) -> dict:
        return {name: self.get_parameter(name).value for name in PARAMETERS
                if self.has_parameter(name)}

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """on-set: refuse any value that cannot work, with the reason."""
        current = {**self._values(), **{p.name: p.value for p in parameters}}
        for parameter in parameters:
            problem = parameter_problem(parameter.name, parameter.value, current)
            if problem is None and parameter.name == 'use_draft' and parameter.value and \
                    getattr(self, '_engine', None) is not None and self._engine.draft is None:
                problem = "use_draft=true but no draft is loaded (draft_dir '' or none found)"
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        """post-set: take the new values into use (at the next frame)."""
        previous, self._settings = self._settings, self._read_settings()
        settings = self._settings
        names = {p.name for p in parameters}
        if names & set(RUNTIME_ENGINE_PARAMETERS):
            self._engine.update_config(**self._engine_config(settings))
            self._reset_window(settings.stats_window)
        elif settings.stats_window != previous.stats_window:
            self._reset_window(settings.stats_window)
        if settings.diagnostics_period != previous.diagnostics_period:
            self._diag_timer.timer_period_ns = int(settings.diagnostics_period * 1e9)
        self.get_logger().info('parameters set: ' + ', '.join(
            f'{p.name}={p.value}' for p in parameters))

    def _read_settings(self) -> Settings:
        v = self._values()
        return Settings(
            use_draft=v['use_draft'], adaptive_proposals=v['adaptive_proposals'],
            acceptance=v['acceptance'],
            tolerance=tuple(v['tolerance']), control_period=v['control_period'],
            action_names=tuple(v['action_names']), frame_id=v['frame_id'],
            max_image_age=v['max_image_age'], action_low=tuple(v['action_low']),
            action_high=tuple(v['action_high']), diagnostics_period=v['diagnostics_period'],
            hardware_id=v['hardware_id'] or v['device'], stats_window=v['stats_window'])

    @staticmethod
    def _engine_config(settings: Settings) -> dict:
        tolerance = settings.tolerance
        return {'use_draft': settings.use_draft, 'adaptive': settings.adaptive_proposals,
                'acceptance': settings.acceptance,
                'tolerance': tolerance[0] if len(tolerance) == 1 else tolerance}

    def _load_engine(self) -> RSDEngine:
        v = self._values()
        try:
            engine = RSDEngine.from_dirs(v['model_dir'] or None, v['draft_dir'], v['device'],
                                         v['dtype'], **self._engine_config(self._settings))
        except Exception as error:
            self.get_logger().fatal(
                f"cannot load the engine (model_dir={v['model_dir']!r}, "
                f"draft_dir={v['draft_dir']!r}): {type(error).__name__}: {error}")
            raise
        action_dim = engine.tokenizer.config.action_dim
        if action_dim != ACTION_DIM:
            raise RuntimeError(f'the model acts in {action_dim} dims; this node publishes '
                               f'{ACTION_DIM} (action_names, limits)')
        if self._settings.use_draft and engine.draft is None:
            if v['draft_dir']:
                self.get_logger().warning(f"use_draft=true but {v['draft_dir']!r} gave no "
                                          'draft: running main-only')
            self.set_parameters([Parameter('use_draft', value=False)])
            self._settings = replace(self._settings, use_draft=False)
        return engine

    def _reset_window(self, size: int) -> None:
        with self._cond:
            self._aggregator = StatsAggregator(size)
            self._latencies = []

    # ------------------------------------------------------------------ callbacks

    def _on_image(self, msg: Image) -> None:
        """Store the newest valid frame for the worker; count what is replaced or refused."""
        received = self.get_clock().now().nanoseconds
        try:
            check_image(msg)
        except ImageConversionError as error:
            with self._cond:
                self._counters.frames += 1
                self._counters.bad_images += 1
            self._log_once('warning', str(error), f'image refused: {error}')
            return
        with self._cond:
            self._counters.frames += 1
            if self._pending is not None:
                self._counters.dropped += 1
            self._pending = (msg, received)
            waiting = self._instruction is None
            self._cond.notify()
        if waiting and not self._said_waiting:
            self._said_waiting = True
            self.get_logger().info(f'images arriving; waiting for an instruction on '
                                   f'{self._instruction_sub.topic_name} before acting')

    def _on_joints(self, msg: JointState) -> None:
        with self._cond:
            self._joints = msg

    def _on_instruction(self, msg: String) -> None:
        problem = instruction_problem(msg.data)
        if problem:
            with self._cond:
                self._counters.bad_instructions += 1
                kept = self._instruction
            self._log_once('warning', problem,
                           f'{problem}; keeping the instruction in force: {kept!r}')
            return
        text = msg.data.strip()
        with self._cond:
            changed, self._instruction = text != self._instruction, text
            self._cond.notify()
        if changed:
            self.get_logger().info(f'instruction: {text!r}')

    def _publish_diagnostics(self) -> None:
        settings = self._settings
        with self._cond:
            counters, new = replace(self._counters), self._counters.since(self._reported)
            self._reported = counters
            waiting, error = self._instruction is None, self._error
            aggregator, latencies = self._aggregator, list(self._latencies)
        level, message = status_level(new, waiting_for_instruction=waiting, error=error)
        config = self._engine.config
        values = status_values(aggregator.summary(), latencies, counters, config.use_draft,
                               mode_name(config.use_draft, config.acceptance))
        status = inference_status(f'{self.get_name()}: inference', settings.hardware_id, level,
                                  message, values)
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), [status]))

    def _log_once(self, level: str, key: str, text: str) -> None:
        """Log each distinct problem `key` once (a bad camera at 30 Hz must not flood the log)."""
        if key in self._logged:
            return
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged.add(key)
        text += ' (logged once; see /diagnostics for counts)'
        # rclpy fixes a call site's severity on first use: one call per level.
        if level == 'error':
            self.get_logger().error(text)
        else:
            self.get_logger().warning(text)

    # ------------------------------------------------------------------ inference worker

    def _run_worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (
                    self._pending is not None and self._instruction is not None))
                if self._stopping:
                    return
                (msg, received), self._pending = self._pending, None
                instruction = self._instruction
            try:
                self._process(msg, received, instruction)
            except Exception as error:     # a bug here must not end inference for good
                with self._cond:
                    self._counters.errors += 1
                    self._error = f'{type(error).__name__}: {error}'
                self.get_logger().error(f'unexpected error processing a frame: {self._error}\n'
                                        f'{traceback.format_exc()}', throttle_duration_sec=10.0)

    def _process(self, msg: Image, received_ns: int, instruction: str) -> None:
        """One frame -> one chunk (or a counted reason why not)."""
        settings = self._settings
        start = self.get_clock().now()
        stamp = Time.from_msg(msg.header.stamp)
        age = (start - stamp).nanoseconds * 1e-9
        if settings.max_image_age > 0 and age > settings.max_image_age:
            with self._cond:
                self._counters.stale += 1
            hint = ' (header.stamp is not set)' if stamp.nanoseconds == 0 else ''
            self.get_logger().warning(
                f'image {age:.3f} s old > max_image_age {settings.max_image_age} s: not acted '
                f'on{hint}', throttle_duration_sec=5.0)
            return
        try:
            image = imgmsg_to_rgb(msg)
        except ImageConversionError as error:
            with self._cond:
                self._counters.bad_images += 1
            self._log_once('warning', str(error), f'image refused: {error}')
            return
        proprio = None
        if self._engine.proprio_names:
            proprio = self._robot_state(stamp, settings)
            if proprio is None:
                return
        converted = self.get_clock().now()
        try:
            actions, stats = self._engine.predict(image, instruction, proprio=proprio)
            predicted = self.get_clock().now()
            chunk, clipped = chunk_to_trajectory(
                actions, msg.header.stamp, settings.frame_id, settings.action_names,
                settings.control_period, settings.action_low, settings.action_high)
        except Exception as error:
            self._engine_failed(error, msg, image, instruction)
            return
        with self._cond:
            if self._stopping or not self.context.ok():
                return                 # shutting down (a signal shuts the context down first)
            try:
                latency_ms = (self.get_clock().now() - stamp).nanoseconds * 1e-6  # -> publish
                self._chunk_pub.publish(chunk)
                counters = self._counters
                counters.chunks += 1
                counters.clipped += clipped
                self._error = None
                self._aggregator.add(stats)
                self._latencies = (self._latencies + [latency_ms])[-settings.stats_window:]
                totals = asdict(counters)
                totals['clipped_total'] = totals.pop('clipped')
                self._stats_pub.publish(String(data=stats_json(
                    stats, msg.header.stamp, latency_ms=latency_ms,
                    receive_ms=(received_ns - stamp.nanoseconds) * 1e-6,
                    wait_ms=(start.nanoseconds - received_ns) * 1e-6,
                    convert_ms=(converted - start).nanoseconds * 1e-6,
                    predict_ms=(predicted - converted).nanoseconds * 1e-6, clipped=clipped,
                    **totals)))
            except RuntimeError:       # rclpy's RCLError
                if self.context.ok():
                    raise              # the context went down between the check and publish

    def _robot_state(self, image_stamp: Time, settings: Settings) -> np.ndarray | None:
        """The newest joint state as the model's proprio [P], or None (counted, logged) when
        there is none, it is malformed, or it is older than the image by more than
        max_image_age."""
        with self._cond:
            joints = self._joints
        try:
            if joints is None:
                raise ValueError(f'no joint_states received on {self._joints_sub.topic_name} '
                                 'yet; the model needs the robot state')
            state = joint_state_vector(joints, self._engine.proprio_names)
        except ValueError as error:
            with self._cond:
                self._counters.no_state += 1
            self._log_once('warning', str(error), f'image not acted on: {error}')
            return None
        lag = (image_stamp - Time.from_msg(joints.header.stamp)).nanoseconds * 1e-9
        if settings.max_image_age > 0 and lag > settings.max_image_age:
            with self._cond:
                self._counters.no_state += 1
            self.get_logger().warning(
                f'joint_states {lag:.3f} s older than the image > max_image_age '
                f'{settings.max_image_age} s: not acted on', throttle_duration_sec=5.0)
            return None
        return state

    def _engine_failed(self, error: Exception, msg: Image, image, instruction: str) -> None:
        summary = f'{type(error).__name__}: {error}'
        with self._cond:
            self._counters.errors += 1
            self._error = summary
        config = self._engine.config
        self._log_once('error', summary, (
            f'inference failed on the image stamped {msg.header.stamp.sec}.'
            f'{msg.header.stamp.nanosec:09d} ({msg.encoding} {msg.width}x{msg.height} -> '
            f'{list(image.shape)}), instruction {instruction!r}, use_draft={config.use_draft}, '
            f'acceptance={config.acceptance}: {summary}\n{traceback.format_exc()}'
            'Skipping this frame; the next one is processed'))

    # ------------------------------------------------------------------ lifetime

    def destroy_node(self) -> None:
        """Stop the worker (a chunk in progress is finished and discarded), then the node."""
        cond = getattr(self, '_cond', None)      # absent if __init__ failed early
        if cond is not None:
            with cond:
                self._stopping = True
                cond.notify_all()
        worker = getattr(self, '_worker', None)
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10.0)
            if worker.is_alive():
                self.get_logger().warning('inference still running at shutdown; not waiting')
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Spin the rsd_policy node until shutdown (args: ROS command line arguments)."""
    try:
        with rclpy.init(args=args):
            node = PolicyNode()
            try:
                rclpy.spin(node)
            except RuntimeError:       # rclpy's RCLError: a signal shut the context down
                if node.context.ok():  # while the executor built its wait set
                    raise
            finally:
                # A signal shuts the context down without destroying its nodes: stop the
                # inference thread before the interpreter exits under it.
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == '__main__':
    main()
