"""The inference thread of `rsd_policy`: the due frames of every arm -> one batch -> each arm's
chunk.

The worker takes a batch from the mailbox (`FrameMailbox.take_batch`: the frames of the arms
that are due together, within the batching window), then checks each frame for its own arm
exactly as a single arm's: older than `max_image_age` or stamped in the future (counted stale /
future), pixels that do not convert (bad image), no usable or an out-of-range robot state when
the model takes one (no_state / bad_state). A frame that fails a check is counted on its arm
and left out; the others go on. The frames that pass are decoded together
(`RSDEngine.predict_batch`; a single frame through `predict`, exactly as with one arm). If a
batch raises, each of its frames is decoded alone, so an input that breaks the engine costs
only its own arm a chunk. Each arm's actions are clipped to the action limits and published on
its own `action_chunk`, stamped with its own image's stamp, then one JSON line on its own
`policy_stats` (with `batch`, the number of frames decoded together; the engine statistics are
the batch's). An engine exception is logged once per distinct error with its context and turns
that arm's diagnostics to ERROR until one of its chunks succeeds.
"""

from collections.abc import Callable
from dataclasses import dataclass
import threading
import traceback

import numpy as np
from rclpy.clock import Clock
from rclpy.context import Context
from rclpy.impl.rcutils_logger import RcutilsLogger
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_core.engine import RSDEngine
from rsd_core.stats import ChunkStats
from rsd_ros import topics
from rsd_ros.arm_channel import ArmChannel
from rsd_ros.frame_checks import stamp_problem, state_problem
from rsd_ros.frame_mailbox import FrameMailbox, Work
from rsd_ros.image_conversion import ImageConversionError, checked_imgmsg_to_rgb
from rsd_ros.messages import chunk_to_trajectory, joint_state_vector, stats_json
from rsd_ros.policy_parameters import Settings

LogOnce = Callable[[str, str, str], None]      # (level, key, text)


@dataclass(frozen=True)
class Frame:
    """A frame that passed its arm's checks, ready for the model."""

    work: Work
    stamp: int                       # ns, the image's header.stamp
    image: np.ndarray                # [H, W, 3] uint8 RGB
    proprio: np.ndarray | None       # [P] robot state, None when the model takes none


@dataclass(frozen=True)
class Decoded:
    """One frame's decoding: actions and stats, or the error that stopped it."""

    actions: np.ndarray | None       # [T, A] float32, action units (None on error)
    stats: ChunkStats | None         # the batch's statistics
    error: Exception | None
    batch: int                       # frames decoded together (1 = alone)


def decode_frames(engine: RSDEngine, frames: list[Frame],
                  ) -> tuple[list[Decoded], Exception | None]:
    """Decode `frames` (non-empty) as one batch; if the batch raises, each frame alone.
    Returns one Decoded per frame, in order, and the batch's exception (None if it ran)."""
    batch_error = None
    if len(frames) > 1:
        proprios = None if frames[0].proprio is None else [f.proprio for f in frames]
        try:
            actions, stats = engine.predict_batch([f.image for f in frames],
                                                  [f.work.instruction for f in frames],
                                                  proprios)           # [B, T, A]
            return [Decoded(row, stats, None, len(frames)) for row in actions], None
        except Exception as error:
            batch_error = error
    decoded = []
    for frame in frames:
        try:
            actions, stats = engine.predict(frame.image, frame.work.instruction,
                                            proprio=frame.proprio)
            decoded.append(Decoded(actions, stats, None, 1))
        except Exception as error:
            decoded.append(Decoded(None, None, error, 1))
    return decoded, batch_error


class InferenceWorker:
    """Runs the inference of every arm on a thread of its own (see the module docstring).

    settings: returns the Settings snapshot in force (read once per batch); clock, logger,
    context: the node's; log_once: the node's limited problem log; state_names: the
    joint_states names of the model's state values.
    """

    def __init__(self, engine: RSDEngine, arms: list[ArmChannel], mailbox: FrameMailbox,
                 settings: Callable[[], Settings], clock: Clock, logger: RcutilsLogger,
                 log_once: LogOnce, context: Context, state_names: tuple[str, ...]) -> None:
        self._engine, self._arms, self._mailbox = engine, arms, mailbox
        self._settings, self._clock, self._logger = settings, clock, logger
        self._log_once, self._context, self._state_names = log_once, context, state_names
        self._thread = threading.Thread(target=self._run, name='rsd_policy_inference',
                                        daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop taking frames and wait up to `timeout` s; True if still running (a chunk in
        progress), False when ended (or when called from the worker itself)."""
        self._mailbox.stop()
        if self._thread is threading.current_thread():
            return False
        self._thread.join(timeout=timeout)
        return self._thread.is_alive()

    def _run(self) -> None:
        while (batch := self._mailbox.take_batch(self._settings().batch_window)) is not None:
            try:
                self._process(batch)
            except Exception as error:     # a bug here must not end inference for good
                summary = f'{type(error).__name__}: {error}'
                for work in batch:
                    self._arms[work.arm].failed(summary)
                self._logger.error(f'unexpected error processing frames of '
                                   f'{[self._arms[w.arm].name for w in batch]}: {summary}\n'
                                   f'{traceback.format_exc()}', throttle_duration_sec=10.0)

    def _process(self, batch: list[Work]) -> None:
        """The frames due together -> one chunk per arm (or a counted reason why not)."""
        settings = self._settings()
        start = self._clock.now()
        frames = [frame for work in batch
                  if (frame := self._prepare(work, start.nanoseconds, settings)) is not None]
        if not frames:
            return
        converted = self._clock.now()
        decoded, batch_error = decode_frames(self._engine, frames)
        predicted = self._clock.now()
        if batch_error is not None:
            summary = f'{type(batch_error).__name__}: {batch_error}'
            self._log_once('error', f'batch: {summary}', (
                f'decoding a batch of {len(frames)} frames failed ({summary}); each frame was '
                'decoded alone'))
        for frame, result in zip(frames, decoded, strict=True):
            arm, msg = self._arms[frame.work.arm], frame.work.frame
            error = result.error
            if error is None:
                try:
                    chunk, clipped = chunk_to_trajectory(
                        result.actions, msg.header.stamp, settings.frame_id,
                        settings.action_names, settings.control_period, settings.action_low,
                        settings.action_high)
                except Exception as refused:
                    error = refused
            if error is not None:
                self._engine_failed(arm, error, frame)
                continue
            timing = {'receive_ms': (frame.work.received_ns - frame.stamp) * 1e-6,
                      'wait_ms': (start.nanoseconds - frame.work.received_ns) * 1e-6,
                      'convert_ms': (converted - start).nanoseconds * 1e-6,
                      'predict_ms': (predicted - converted).nanoseconds * 1e-6}
            self._publish(arm, chunk, clipped, result, frame.stamp, timing, settings)

    def _prepare(self, work: Work, now: int, settings: Settings) -> Frame | None:
        """`work` as a Frame the model may see, or None (counted on its arm, logged)."""
        arm, msg = self._arms[work.arm], work.frame
        stamp = topics.stamp_ns(msg.header.stamp)                # ns; rclpy Time refuses < 0
        problem = stamp_problem(stamp, now, settings.max_image_age, settings.max_clock_skew)
        if problem is not None:
            counter, text = problem
            arm.count(**{counter: 1})
            self._logger.warning(arm.label + text, throttle_duration_sec=5.0)
            return None
        try:
            image = checked_imgmsg_to_rgb(msg)
        except ImageConversionError as error:
            arm.count(bad_images=1)
            self._log_once('warning', arm.label + str(error), f'{arm.label}image refused: {error}')
            return None
        proprio = None
        if self._engine.proprio_names:
            proprio = self._robot_state(arm, stamp, settings)
            if proprio is None:
                return None
        return Frame(work, stamp, image, proprio)

    def _robot_state(self, arm: ArmChannel, image_stamp: int, settings: Settings,
                     ) -> np.ndarray | None:
        """The arm's newest joint state as the model's proprio [P], or None (counted, logged)
        when there is none, it is malformed, out of range, or older than the image by more
        than max_image_age."""
        joints = self._mailbox.joints(arm.index)
        try:
            if joints is None:
                raise ValueError(f'no joint_states received on {arm.joints_sub.topic_name} '
                                 'yet; the model needs the robot state')
            state = joint_state_vector(joints, self._state_names)
        except ValueError as error:
            arm.count(no_state=1)
            self._log_once('warning', arm.label + str(error),
                           f'{arm.label}image not acted on: {error}')
            return None
        problem = state_problem(state, self._state_names, settings.max_state_abs)
        if problem:
            arm.count(bad_state=1)
            self._log_once('warning', arm.label + problem,
                           f'{arm.label}{problem}: image not acted on')
            return None
        lag = (image_stamp - topics.stamp_ns(joints.header.stamp)) * 1e-9
        if settings.max_image_age > 0 and lag > settings.max_image_age:
            arm.count(no_state=1)
            self._logger.warning(
                f'{arm.label}joint_states {lag:.3f} s older than the image > max_image_age '
                f'{settings.max_image_age} s: not acted on', throttle_duration_sec=5.0)
            return None
        return state

    def _publish(self, arm: ArmChannel, chunk: JointTrajectory, clipped: int,
                 result: Decoded, stamp: int, timing: dict, settings: Settings) -> None:
        """Publish the arm's chunk and its policy_stats line, unless the node is shutting
        down or no longer active."""
        with self._mailbox.open_for_output() as open_:
            if not open_ or not self._context.ok():
                return                 # shutting down (a signal shuts the context down first)
            try:
                latency_ms = (self._clock.now().nanoseconds - stamp) * 1e-6  # -> publish
                arm.chunk_pub.publish(chunk)
                totals = arm.published(result.stats, latency_ms, clipped, result.batch,
                                       settings.stats_window)
                arm.stats_pub.publish(String(data=stats_json(
                    result.stats, chunk.header.stamp, latency_ms=latency_ms, clipped=clipped,
                    batch=result.batch, **timing, **totals)))
            except RuntimeError:       # rclpy's RCLError
                if self._context.ok():
                    raise              # the context went down between the check and publish

    def _engine_failed(self, arm: ArmChannel, error: Exception, frame: Frame) -> None:
        summary = f'{type(error).__name__}: {error}'
        arm.failed(summary)
        config, msg = self._engine.config, frame.work.frame
        self._log_once('error', arm.label + summary, (
            f'{arm.label}inference failed on the image stamped {msg.header.stamp.sec}.'
            f'{msg.header.stamp.nanosec:09d} ({msg.encoding} {msg.width}x{msg.height} -> '
            f'{list(frame.image.shape)}), instruction {frame.work.instruction!r}, '
            f'use_draft={config.use_draft}, acceptance={config.acceptance}: {summary}\n'
            f'{"".join(traceback.format_exception(error))}'
            'Skipping this frame; the next one is processed'))
