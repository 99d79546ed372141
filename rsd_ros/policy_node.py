"""The `rsd_policy` node: camera image + instruction -> action chunk (JointTrajectory).

Lifecycle. A managed node (rclpy.lifecycle): configure loads and validates the model and
creates the topics; activate starts acting on frames; deactivate stops at once (the frame not
yet taken is dropped, a chunk still being computed is discarded, nothing is published while
inactive) but keeps the model; cleanup frees the model. With `autostart` (the default) the node
configures and activates itself on start, so one command still starts a working policy, and a
failure to load raises as before; with `autostart:=false` a lifecycle manager (or
`ros2 lifecycle set`) drives it through the standard change_state / get_state services.

Topics (relative names) and QoS are the topic contract's (rsd_ros.topics), parameters those of
rsd_ros.policy_parameters (both documented in docs/ARCHITECTURE.md).

Threads. Subscriptions, parameter services and the diagnostics timer run on the executor that
spins the node (a SingleThreadedExecutor in `main`). Inference runs on one dedicated worker
thread that the image callback hands the newest frame to through a one-slot mailbox
(rsd_ros.frame_mailbox) guarded by a `threading.Condition`. Chosen over a timer in a
MutuallyExclusiveCallbackGroup on a MultiThreadedExecutor because:
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

from dataclasses import asdict, replace
import threading
import traceback

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterUninitializedException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_core.engine import RSDEngine
from rsd_core.stats import ChunkStats, StatsAggregator
from rsd_ros import topics
from rsd_ros.frame_checks import stamp_problem, state_problem
from rsd_ros.frame_mailbox import FrameMailbox, Work
from rsd_ros.image_conversion import (
    ImageConversionError,
    check_image_message,
    checked_imgmsg_to_rgb,
)
from rsd_ros.log_limiter import LogLimiter
from rsd_ros.messages import (
    PolicyCounters,
    chunk_to_trajectory,
    diagnostic_array,
    inference_status,
    joint_state_vector,
    mode_name,
    stats_json,
    status_level,
    status_values,
)
from rsd_ros.policy_parameters import (
    ACTION_DIM,
    PARAMETERS,
    RUNTIME_ENGINE_PARAMETERS,
    Ceilings,
    Settings,
    ceilings,
    engine_config,
    instruction_problem,
    parameter_problem,
    read_settings,
    state_names,
    widening,
)

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
MAX_LOG_CHARS = 2000            # one problem report, before its suffix


class PolicyNode(LifecycleNode):
    """Subscribes camera/image_raw + instruction, publishes action_chunk, policy_stats and
    /diagnostics; a managed node (see the module docstring). `node_kwargs` go to rclpy's Node
    (context, parameter_overrides, ...)."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('rsd_policy', **node_kwargs)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self._ceilings: Ceilings | None = None
        self.declare_parameters('', [(name, default, descriptor)
                                     for name, (default, descriptor) in PARAMETERS.items()])
        self._settings = read_settings(self._values())
        self._ceilings = ceilings(self._values())
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._engine: RSDEngine | None = None
        self._state_names: tuple[str, ...] = ()
        self._configure_error: Exception | None = None
        self._mailbox = FrameMailbox()
        self._lock = threading.Lock()           # guards the bookkeeping below
        self._counters = PolicyCounters()
        self._reported = PolicyCounters()
        self._error: str | None = None
        self._aggregator = StatsAggregator(self._settings.stats_window)
        self._latencies: list[float] = []
        self._limiter = LogLimiter()
        self._said_waiting = False
        self._worker: threading.Thread | None = None
        self._entities: list = []               # topics and the timer, made in configure
        if self.get_parameter('autostart').value:
            self._start()

    def _start(self) -> None:
        """Configure and activate now (autostart); a failure raises as a plain node would."""
        if self.trigger_configure() != SUCCESS:
            raise self._configure_error or RuntimeError('rsd_policy could not configure')
        if self.trigger_activate() != SUCCESS:
            raise RuntimeError('rsd_policy could not activate')

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load and validate the model, create the topics and the inference worker."""
        try:
            self._engine = self._load_engine()
            self._state_names = state_names(self._settings, self._engine.proprio_names)
        except Exception as error:
            self._configure_error, self._engine = error, None
            self.get_logger().fatal(f'configure failed: {type(error).__name__}: {error}')
            return FAILURE
        self._mailbox = FrameMailbox()
        self._create_topics()
        self._worker = threading.Thread(target=self._run_worker, name='rsd_policy_inference',
                                        daemon=True)
        self._worker.start()
        mapped = f' (state from {list(self._state_names)})' if self._state_names else ''
        self.get_logger().info(
            f'configured: {self._image_sub.topic_name} + {self._instruction_sub.topic_name}'
            f'{" + " + self._joints_sub.topic_name if self._joints_sub else ""} -> '
            f'{self._chunk_pub.topic_name} (draft: {"yes" if self._engine.draft else "no"}, '
            f'use_draft={self._engine.config.use_draft}, '
            f'acceptance={self._settings.acceptance}){mapped}')
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start acting on frames."""
        self._mailbox.open()
        self.get_logger().info('active: acting on camera frames')
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop commanding the arm at once; the model stays loaded."""
        self._mailbox.close()
        self.get_logger().info('inactive: not acting on frames (model kept)')
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker, remove the topics, free the model."""
        self._teardown()
        self.get_logger().info('cleaned up: model unloaded')
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def _create_topics(self) -> None:
        self._chunk_pub = self.create_publisher(JointTrajectory, topics.ACTION_CHUNK,
                                                topics.CHUNK_QOS)
        self._stats_pub = self.create_publisher(String, topics.POLICY_STATS, topics.STATS_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS,
                                               topics.STATS_QOS)
        self._image_sub = self.create_subscription(Image, topics.CAMERA, self._on_image,
                                                   topics.SENSOR_QOS)
        self._instruction_sub = self.create_subscription(
            String, topics.INSTRUCTION, self._on_instruction, topics.INSTRUCTION_QOS)
        self._joints_sub = None
        if self._engine.proprio_names:      # the model takes proprioception
            self._joints_sub = self.create_subscription(
                JointState, topics.JOINT_STATES, self._mailbox.put_joints, topics.SENSOR_QOS)
        self._diag_timer = self.create_timer(self._settings.diagnostics_period,
                                             self._publish_diagnostics)
        self._entities = [e for e in (self._chunk_pub, self._stats_pub, self._diag_pub,
                                      self._image_sub, self._instruction_sub, self._joints_sub,
                                      self._diag_timer) if e is not None]

    def stop_worker(self, timeout: float) -> bool:
        """Stop publishing at once and wait up to `timeout` s for the worker; True if it is
        still running (a chunk in progress), False when it has ended or never started."""
        self._mailbox.stop()
        worker = self._worker
        if worker is None or worker is threading.current_thread():
            return False
        worker.join(timeout=timeout)
        return worker.is_alive()

    def _teardown(self) -> None:
        """Stop and join the worker, destroy the topics and the timer, drop the model."""
        if self.stop_worker(10.0):
            self.get_logger().warning('inference still running at shutdown; not waiting')
        self._worker = None
        destroy = {'Publisher': self.destroy_publisher, 'Subscription':
                   self.destroy_subscription, 'Timer': self.destroy_timer}
        for entity in self._entities:
            destroy[type(entity).__name__](entity)
        self._entities, self._engine = [], None

    # ------------------------------------------------------------------ parameters

    def _values(self) -> dict:
        values = {}
        for name in PARAMETERS:
            if self.has_parameter(name):
                try:
                    values[name] = self.get_parameter(name).value
                except ParameterUninitializedException:
                    values[name] = None            # a typed parameter nobody set
        return values

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """on-set: refuse any value that cannot work, with the reason."""
        current = {**self._values(), **{p.name: p.value for p in parameters}}
        for parameter in parameters:
            problem = parameter_problem(parameter.name, parameter.value, current)
            if problem is None and self._ceilings is not None:      # a run-time change
                problem = widening(parameter.name, parameter.value, self._ceilings)
            if problem is None and parameter.name == 'use_draft' and parameter.value and \
                    getattr(self, '_engine', None) is not None and self._engine.draft is None:
                problem = "use_draft=true but no draft is loaded (draft_dir '' or none found)"
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        """post-set: take the new values into use (at the next frame)."""
        previous, self._settings = self._settings, read_settings(self._values())
        settings = self._settings
        names = {p.name for p in parameters}
        if names & set(RUNTIME_ENGINE_PARAMETERS) and self._engine is not None:
            self._engine.update_config(**engine_config(settings))
            self._reset_window(settings.stats_window)
        elif settings.stats_window != previous.stats_window:
            self._reset_window(settings.stats_window)
        if settings.diagnostics_period != previous.diagnostics_period and self._entities:
            self._diag_timer.timer_period_ns = int(settings.diagnostics_period * 1e9)
        self.get_logger().info('parameters set: ' + ', '.join(
            f'{p.name}={p.value}' for p in parameters))

    def _load_engine(self) -> RSDEngine:
        v = self._values()
        try:
            engine = RSDEngine.from_dirs(v['model_dir'] or None, v['draft_dir'], v['device'],
                                         v['dtype'], **engine_config(self._settings))
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
        with self._lock:
            self._aggregator = StatsAggregator(size)
            self._latencies = []

    # ------------------------------------------------------------------ callbacks

    def _on_image(self, msg: Image) -> None:
        """Store the newest valid frame for the worker; count what is replaced or refused."""
        received = self.get_clock().now().nanoseconds
        try:
            check_image_message(msg)
        except ImageConversionError as error:
            self._count(frames=1, bad_images=1)
            self._log_once('warning', str(error), f'image refused: {error}')
            return
        replaced = self._mailbox.put_frame(msg, received)
        self._count(frames=1, dropped=int(bool(replaced)), inactive=int(replaced is None))
        if self._mailbox.instruction is None and not self._said_waiting:
            self._said_waiting = True
            self.get_logger().info(f'images arriving; waiting for an instruction on '
                                   f'{self._instruction_sub.topic_name} before acting')

    def _on_instruction(self, msg: String) -> None:
        """Put a valid instruction in force; refuse (count, log once, keep the one in force)
        one that is too long in bytes (before anything else reads it) or in prompt tokens,
        empty, or not UTF-8."""
        problem = instruction_problem(msg.data, self._settings.max_instruction_bytes)
        if problem is None:
            try:
                self._engine.main.processor.encode_text([msg.data])
            except ValueError as error:
                problem = str(error)
        if problem:
            self._count(bad_instructions=1)
            self._log_once('warning', problem, f'{problem}; keeping the instruction in force: '
                                               f'{self._mailbox.instruction!r}')
            return
        text = msg.data.strip()
        if self._mailbox.put_instruction(text):
            self.get_logger().info(f'instruction: {text!r}')

    def _publish_diagnostics(self) -> None:
        settings = self._settings
        with self._lock:
            counters, new = replace(self._counters), self._counters.since(self._reported)
            self._reported = counters
            error, aggregator, latencies = self._error, self._aggregator, list(self._latencies)
        waiting = self._mailbox.instruction is None
        level, message = status_level(new, waiting_for_instruction=waiting, error=error,
                                      active=self._mailbox.is_open)
        config = self._engine.config
        values = status_values(aggregator.summary(), latencies, counters, config.use_draft,
                               mode_name(config.use_draft, config.acceptance))
        status = inference_status(f'{self.get_name()}: inference', settings.hardware_id, level,
                                  message, values)
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), [status]))

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + amount)

    def _log_once(self, level: str, key: str, text: str) -> None:
        """Log each distinct problem `key` once, a few per minute (rsd_ros.log_limiter): a bad
        camera at 30 Hz or a hostile peer must not flood the log. Counts stay exact in
        /diagnostics."""
        admitted, suppressed = self._limiter.admit(key)
        if not admitted:
            return
        more = f'; {suppressed} more distinct problems were not logged' if suppressed else ''
        text = text[:MAX_LOG_CHARS] + f' (logged once{more}; see /diagnostics for counts)'
        # rclpy fixes a call site's severity on first use: one call per level.
        if level == 'error':
            self.get_logger().error(text)
        else:
            self.get_logger().warning(text)

    # ------------------------------------------------------------------ inference worker

    def _run_worker(self) -> None:
        while (work := self._mailbox.take()) is not None:
            try:
                self._process(work)
            except Exception as error:     # a bug here must not end inference for good
                with self._lock:
                    self._counters.errors += 1
                    self._error = f'{type(error).__name__}: {error}'
                self.get_logger().error(f'unexpected error processing a frame: {self._error}\n'
                                        f'{traceback.format_exc()}', throttle_duration_sec=10.0)

    def _process(self, work: Work) -> None:
        """One frame -> one chunk (or a counted reason why not): fresh enough, converted, with
        the robot state if the model takes it, inferred, clipped and published."""
        settings, msg = self._settings, work.frame
        start = self.get_clock().now()
        stamp = topics.stamp_ns(msg.header.stamp)                # ns; rclpy Time refuses < 0
        if not self._fresh(stamp, start.nanoseconds, settings):
            return
        try:
            image = checked_imgmsg_to_rgb(msg)
        except ImageConversionError as error:
            self._count(bad_images=1)
            self._log_once('warning', str(error), f'image refused: {error}')
            return
        proprio = None
        if self._engine.proprio_names:
            proprio = self._robot_state(stamp, settings)
            if proprio is None:
                return
        converted = self.get_clock().now()
        try:
            actions, stats = self._engine.predict(image, work.instruction, proprio=proprio)
            predicted = self.get_clock().now()
            chunk, clipped = chunk_to_trajectory(
                actions, msg.header.stamp, settings.frame_id, settings.action_names,
                settings.control_period, settings.action_low, settings.action_high)
        except Exception as error:
            self._engine_failed(error, msg, image, work.instruction)
            return
        timing = {'receive_ms': (work.received_ns - stamp) * 1e-6,
                  'wait_ms': (start.nanoseconds - work.received_ns) * 1e-6,
                  'convert_ms': (converted - start).nanoseconds * 1e-6,
                  'predict_ms': (predicted - converted).nanoseconds * 1e-6}
        self._publish(chunk, clipped, stats, stamp, timing, settings)

    def _fresh(self, stamp: int, now: int, settings: Settings) -> bool:
        """Whether an image stamped `stamp` (ns) may be acted on at `now` (ns); else counted
        (stale or future) and said, throttled."""
        problem = stamp_problem(stamp, now, settings.max_image_age, settings.max_clock_skew)
        if problem is None:
            return True
        counter, text = problem
        self._count(**{counter: 1})
        self.get_logger().warning(text, throttle_duration_sec=5.0)
        return False

    def _publish(self, chunk: JointTrajectory, clipped: int, stats: ChunkStats, stamp: int,
                 timing: dict, settings: Settings) -> None:
        """Publish the chunk and its policy_stats line, unless the node is shutting down."""
        with self._mailbox.open_for_output() as open_:
            if not open_ or not self.context.ok():
                return                 # shutting down (a signal shuts the context down first)
            try:
                latency_ms = (self.get_clock().now().nanoseconds - stamp) * 1e-6  # -> publish
                self._chunk_pub.publish(chunk)
                with self._lock:
                    counters = self._counters
                    counters.chunks += 1
                    counters.clipped += clipped
                    self._error = None
                    self._aggregator.add(stats)
                    self._latencies = (self._latencies + [latency_ms])[-settings.stats_window:]
                    totals = asdict(counters)
                totals['clipped_total'] = totals.pop('clipped')
                self._stats_pub.publish(String(data=stats_json(
                    stats, chunk.header.stamp, latency_ms=latency_ms, clipped=clipped,
                    **timing, **totals)))
            except RuntimeError:       # rclpy's RCLError
                if self.context.ok():
                    raise              # the context went down between the check and publish

    def _robot_state(self, image_stamp: int, settings: Settings) -> np.ndarray | None:
        """The newest joint state as the model's proprio [P], or None (counted, logged) when
        there is none, it is malformed, or it is older than the image by more than
        max_image_age."""
        joints = self._mailbox.joints
        try:
            if joints is None:
                raise ValueError(f'no joint_states received on {self._joints_sub.topic_name} '
                                 'yet; the model needs the robot state')
            state = joint_state_vector(joints, self._state_names)
        except ValueError as error:
            self._count(no_state=1)
            self._log_once('warning', str(error), f'image not acted on: {error}')
            return None
        problem = state_problem(state, self._state_names, settings.max_state_abs)
        if problem:
            self._count(bad_state=1)
            self._log_once('warning', problem, f'{problem}: image not acted on')
            return None
        lag = (image_stamp - topics.stamp_ns(joints.header.stamp)) * 1e-9
        if settings.max_image_age > 0 and lag > settings.max_image_age:
            self._count(no_state=1)
            self.get_logger().warning(
                f'joint_states {lag:.3f} s older than the image > max_image_age '
                f'{settings.max_image_age} s: not acted on', throttle_duration_sec=5.0)
            return None
        return state

    def _engine_failed(self, error: Exception, msg: Image, image, instruction: str) -> None:
        summary = f'{type(error).__name__}: {error}'
        with self._lock:
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
        if getattr(self, '_entities', None) is not None:    # absent if __init__ failed early
            self._teardown()
        super().destroy_node()
