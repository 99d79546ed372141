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

Arms. With `arms` unset the node serves one arm on its own topics. With `arms` = [a, b, ...]
one model serves every arm: arm `a` has the same topics under `a/` (rsd_ros.arm_channel), its
own instruction, counters, policy_stats and diagnostics status ('rsd_policy: a inference', all
in one DiagnosticArray), and every check below applies to each arm's frames on their own.
Frames of several arms that are due together are decoded as one batch; after the first frame
the worker waits at most `batch_window` s for the others (rsd_ros.frame_mailbox), so a slow or
silent arm never holds the others back longer than that. All arms share the node's other
parameters (limits, names, period, staleness bound, state mapping).

Threads. Subscriptions, parameter services and the diagnostics timer run on the executor that
spins the node (a SingleThreadedExecutor in `main`). Inference runs on one dedicated worker
thread (rsd_ros.inference_worker) that the image callbacks hand the newest frame of each arm
to through a mailbox of one slot per arm (rsd_ros.frame_mailbox) guarded by a
`threading.Condition`. Chosen over a timer in a MutuallyExclusiveCallbackGroup on a
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
frame replaced before the worker took it is counted as dropped. The worker (details in
rsd_ros.inference_worker) refuses frames older than `max_image_age` (now - header.stamp,
counted stale), converts the pixels (cv_bridge, see image_conversion), runs the engine with
the instruction in force at that moment (the latest valid one received; until the first one
arrives the node waits and says so once), clips to the action limits and publishes the chunk
stamped with the image's stamp, then one JSON line on `policy_stats`. A model that takes
proprioception also gets the newest `joint_states` message (subscribed only then), its
positions picked by the model's joint names; without a usable one (none yet, a joint
missing, older than the image by more than `max_image_age`) the frame is counted as
`no_state` and skipped. Bad input (image or instruction) is logged once per distinct
problem and counted; an invalid instruction (empty, whitespace, not UTF-8) does not replace the
one in force. An engine exception is logged once per distinct error with its context, turns the
diagnostics to ERROR until a chunk succeeds, and the next good frame is processed.
"""

from dataclasses import replace
from functools import partial

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterUninitializedException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_core.engine import RSDEngine
from rsd_ros import topics
from rsd_ros.arm_channel import ArmChannel
from rsd_ros.frame_mailbox import FrameMailbox
from rsd_ros.image_conversion import ImageConversionError, check_image_message
from rsd_ros.inference_worker import InferenceWorker
from rsd_ros.log_limiter import LogLimiter
from rsd_ros.messages import (
    diagnostic_array,
    inference_status,
    mode_name,
    status_level,
    status_values,
)
from rsd_ros.policy_parameters import (
    ACTION_DIM,
    PARAMETERS,
    RUNTIME_ENGINE_PARAMETERS,
    Ceilings,
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
    /diagnostics, for one arm or for each of `arms`; a managed node (see the module docstring).
    `node_kwargs` go to rclpy's Node (context, parameter_overrides, ...)."""

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
        self._arms = [ArmChannel(i, name, self._settings.stats_window)
                      for i, name in enumerate(self._settings.arms or ('',))]
        self._mailbox = FrameMailbox(len(self._arms))
        self._limiter = LogLimiter()
        self._worker: InferenceWorker | None = None
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
        self._mailbox = FrameMailbox(len(self._arms))
        self._create_topics()
        self._worker = InferenceWorker(self._engine, self._arms, self._mailbox,
                                       lambda: self._settings, self.get_clock(),
                                       self.get_logger(), self._log_once, self.context,
                                       self._state_names)
        self._worker.start()
        mapped = f' (state from {list(self._state_names)})' if self._state_names else ''
        arms = [arm.name for arm in self._arms if arm.name]
        served = f'{len(arms)} arms {arms}, batch window {self._settings.batch_window} s: ' \
            if arms else ''
        first = self._arms[0]
        self.get_logger().info(
            f'configured: {served}{first.image_sub.topic_name} + '
            f'{first.instruction_sub.topic_name}'
            f'{" + " + first.joints_sub.topic_name if first.joints_sub else ""} -> '
            f'{first.chunk_pub.topic_name}{" ..." if arms else ""} '
            f'(draft: {"yes" if self._engine.draft else "no"}, '
            f'use_draft={self._engine.config.use_draft}, '
            f'acceptance={self._settings.acceptance}){mapped}')
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start acting on frames."""
        self._mailbox.open()
        self.get_logger().info('active: acting on camera frames')
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop commanding the arms at once; the model stays loaded."""
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
        """Each arm's publishers and subscriptions (rsd_ros.topics names and QoS, under the
        arm's namespace), /diagnostics and its timer."""
        for arm in self._arms:
            arm.chunk_pub = self.create_publisher(JointTrajectory, arm.topic(topics.ACTION_CHUNK),
                                                  topics.CHUNK_QOS)
            arm.stats_pub = self.create_publisher(String, arm.topic(topics.POLICY_STATS),
                                                  topics.STATS_QOS)
            arm.image_sub = self.create_subscription(
                Image, arm.topic(topics.CAMERA), partial(self._on_image, arm), topics.SENSOR_QOS)
            arm.instruction_sub = self.create_subscription(
                String, arm.topic(topics.INSTRUCTION), partial(self._on_instruction, arm),
                topics.INSTRUCTION_QOS)
            arm.joints_sub = None
            if self._engine.proprio_names:      # the model takes proprioception
                arm.joints_sub = self.create_subscription(
                    JointState, arm.topic(topics.JOINT_STATES),
                    partial(self._mailbox.put_joints, arm.index), topics.SENSOR_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS,
                                               topics.STATS_QOS)
        self._diag_timer = self.create_timer(self._settings.diagnostics_period,
                                             self._publish_diagnostics)
        self._entities = [e for arm in self._arms for e in arm.entities()] + [
            self._diag_pub, self._diag_timer]

    def stop_worker(self, timeout: float) -> bool:
        """Stop publishing at once and wait up to `timeout` s for the worker; True if it is
        still running (a chunk in progress), False when it has ended or never started."""
        self._mailbox.stop()
        worker = self._worker
        return worker is not None and worker.stop(timeout)

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
            self._reset_windows(settings.stats_window)
        elif settings.stats_window != previous.stats_window:
            self._reset_windows(settings.stats_window)
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

    def _reset_windows(self, size: int) -> None:
        for arm in self._arms:
            arm.reset_window(size)

    # ------------------------------------------------------------------ callbacks

    def _on_image(self, arm: ArmChannel, msg: Image) -> None:
        """Store the arm's newest valid frame for the worker; count what is replaced or
        refused."""
        received = self.get_clock().now().nanoseconds
        try:
            check_image_message(msg)
        except ImageConversionError as error:
            arm.count(frames=1, bad_images=1)
            self._log_once('warning', arm.label + str(error), f'{arm.label}image refused: {error}')
            return
        replaced = self._mailbox.put_frame(arm.index, msg, received)
        arm.count(frames=1, dropped=int(bool(replaced)), inactive=int(replaced is None))
        if self._mailbox.instruction(arm.index) is None and not arm.said_waiting:
            arm.said_waiting = True
            self.get_logger().info(f'{arm.label}images arriving; waiting for an instruction on '
                                   f'{arm.instruction_sub.topic_name} before acting')

    def _on_instruction(self, arm: ArmChannel, msg: String) -> None:
        """Put a valid instruction in force for the arm; refuse (count, log once, keep the one
        in force) one that is too long in bytes (before anything else reads it) or in prompt
        tokens, empty, or not UTF-8."""
        problem = instruction_problem(msg.data, self._settings.max_instruction_bytes)
        if problem is None:
            try:
                self._engine.main.processor.encode_text([msg.data])
            except ValueError as error:
                problem = str(error)
        if problem:
            arm.count(bad_instructions=1)
            self._log_once('warning', arm.label + problem, (
                f'{arm.label}{problem}; keeping the instruction in force: '
                f'{self._mailbox.instruction(arm.index)!r}'))
            return
        text = msg.data.strip()
        if self._mailbox.put_instruction(arm.index, text):
            self.get_logger().info(f'{arm.label}instruction: {text!r}')

    def _publish_diagnostics(self) -> None:
        """One inference status per arm, in one DiagnosticArray."""
        settings, config = self._settings, self._engine.config
        active = self._mailbox.is_open
        statuses = []
        for arm in self._arms:
            report = arm.report()
            level, message = status_level(
                report.new, waiting_for_instruction=self._mailbox.instruction(arm.index) is None,
                error=report.error, active=active)
            values = status_values(report.summary, report.latencies_ms, report.counters,
                                   config.use_draft, mode_name(config.use_draft,
                                                               config.acceptance),
                                   report.batch_sizes)
            statuses.append(inference_status(arm.status_name(self.get_name()),
                                             settings.hardware_id, level, message, values))
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), statuses))

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

    # ------------------------------------------------------------------ lifetime

    def destroy_node(self) -> None:
        """Stop the worker (a chunk in progress is finished and discarded), then the node."""
        if getattr(self, '_entities', None) is not None:    # absent if __init__ failed early
            self._teardown()
        super().destroy_node()
