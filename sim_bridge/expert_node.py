"""`libero_expert`: the scripted libero_spatial expert as a policy node (privileged state).

Subscribes `instruction` (reliable, transient local) and the bridge's privileged state
`sim/object_poses` (std_msgs/String JSON: `stamp`, `objects`, `eef_pos`, `eef_quat`,
`gripper_qpos`, `episode`, `step`, ...; see docs/ARCHITECTURE.md); publishes one
`action_chunk` (trajectory_msgs/JointTrajectory) per state, stamped with the state's stamp (the
stamp of the camera image of the same observation), so the bridge's lockstep mode accepts it
as the answer. With `use_image_stamp` it answers each `camera/image_raw` instead, with the
image's stamp and the newest state.

The instruction names the task; its BDDL goal (which bowl, which plate) comes from LIBERO's
benchmark (`expert.resolve_goal`). A new episode (another `episode`/`init_state`/task in the
state, or a step counter that went back) restarts the expert; a republished observation (same
episode and step) gets the same chunk again under the new stamp. The expert plans each chunk
from the state its previous chunk ends in, so the bridge must execute whole chunks
(`observation_interval` 0; `rsd eval-libero --policy expert` sets it).

Any peer on the domain can publish `sim/object_poses`: a state that is not a JSON object, has a
stamp that is not {sec: int32, nanosec: 0..999999999}, a step that is not an integer, or poses
that are not finite numbers of the right count is refused (counted in `refused_states`; one
warning at most every 5 s, values echoed cut to 80 characters) and the node goes on;
a chunk that came out non-finite is not published (docs/HARDENING.md).
"""

import json

from builtin_interfaces.msg import Time
import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_ros import topics
from sim_bridge.expert import ACTION_DIM, Goal, SceneState, SpatialExpert, resolve_goal
from sim_bridge.expert.scene import cut

INT32 = (-2 ** 31, 2 ** 31 - 1)
WARN_EVERY = 5.0           # s, at least, between two warnings about refused states


def chunk_trajectory(actions: np.ndarray, stamp: Time, joint_names: list[str],
                     control_period: float, frame_id: str = '') -> JointTrajectory:
    """Actions [T, A] -> JointTrajectory packed as the topic contract says (as rsd_policy
    packs its chunks), header.stamp = stamp."""
    if actions.ndim != 2 or actions.shape[1] != len(joint_names):
        raise ValueError(f'actions {list(actions.shape)} do not match {len(joint_names)} '
                         'joint names; expected [T, A]')
    return topics.pack_chunk(actions, stamp, frame_id, joint_names, control_period)


def state_stamp(stamp: object) -> Time:
    """A privileged state's `stamp` as a Time, or ValueError saying what is wrong: it must be
    {sec: int32, nanosec: integer in [0, 1e9)} (JSON integers, as the bridge writes them)."""
    if not isinstance(stamp, dict) or not {'sec', 'nanosec'} <= stamp.keys():
        raise ValueError('no stamp {sec, nanosec}; set use_image_stamp to take the stamp from '
                         'the images')
    sec, nanosec = stamp['sec'], stamp['nanosec']
    if not all(type(v) is int for v in (sec, nanosec)) or not INT32[0] <= sec <= INT32[1] \
            or not 0 <= nanosec < 1_000_000_000:
        raise ValueError(f'stamp {cut(stamp)}; expected integers sec (int32) and nanosec '
                         '(0..999999999)')
    return Time(sec=sec, nanosec=nanosec)


def episode_key(data: dict) -> tuple:
    """What identifies one episode in the privileged state."""
    return tuple(data.get(key) for key in ('suite', 'task_id', 'episode', 'init_state'))


class ExpertNode(Node):
    """Answers every privileged state (or image) with the expert's next action chunk."""

    def __init__(self, **kwargs):
        super().__init__('libero_expert', **kwargs)
        self.declare_parameter('suite', 'libero_spatial', ParameterDescriptor(
            description='LIBERO suite whose task language the instruction is', read_only=True))
        self.declare_parameter('control_period', 0.05, ParameterDescriptor(
            description='s between chunk points (time_from_start = (i + 1) x period)',
            read_only=True))
        self.declare_parameter(
            'action_names', list(topics.LIBERO_ACTION_NAMES), ParameterDescriptor(
                description='joint_names of action_chunk, one per action dimension',
                read_only=True))
        self.declare_parameter('frame_id', '', ParameterDescriptor(
            description='header.frame_id of action_chunk', read_only=True))
        self.declare_parameter('use_image_stamp', False, ParameterDescriptor(
            description='answer camera/image_raw with its stamp instead of each state',
            read_only=True))
        self.suite = self.get_parameter('suite').value
        self.period = float(self.get_parameter('control_period').value)
        self.action_names = list(self.get_parameter('action_names').value)
        self.frame_id = self.get_parameter('frame_id').value
        self.use_image_stamp = bool(self.get_parameter('use_image_stamp').value)
        if self.period <= 0 or len(self.action_names) != ACTION_DIM:
            raise ValueError(f'control_period {self.period} s must be > 0 and action_names '
                             f'{self.action_names} must have {ACTION_DIM} names')

        self.chunk_pub = self.create_publisher(JointTrajectory, topics.ACTION_CHUNK,
                                               topics.CHUNK_QOS)
        self.create_subscription(String, topics.INSTRUCTION, self._on_instruction,
                                 topics.INSTRUCTION_QOS)
        self.create_subscription(String, topics.OBJECT_POSES, self._on_poses, topics.POSES_QOS)
        if self.use_image_stamp:
            self.create_subscription(Image, topics.CAMERA, self._on_image, topics.SENSOR_QOS)
        self.instruction: str | None = None
        self.goal: Goal | None = None
        self.expert: SpatialExpert | None = None
        self._episode: tuple | None = None
        self._last_step: int | None = None
        self._last_chunk: np.ndarray | None = None
        self._pending: dict | None = None    # newest state, waiting for an image
        self.chunks_published = 0
        self.refused_states = 0              # states not acted on: malformed or unusable

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip()
        if not text:
            self.get_logger().warning('empty instruction ignored')
            return
        if text != self.instruction:
            self._set_instruction(text)

    def _set_instruction(self, text: str) -> None:
        self.instruction = text
        try:
            self.goal = resolve_goal(text, self.suite)
        except ValueError as exc:
            self.goal, self.expert = None, None
            self.get_logger().error(f'cannot act on the instruction: {exc}')
            return
        self.expert = SpatialExpert(self.goal)
        self._episode = None
        self.get_logger().info(f'"{text}": move {self.goal.obj} onto {self.goal.target}')

    def _on_poses(self, msg: String) -> None:
        try:
            data = json.loads(msg.data)
            if not isinstance(data, dict):
                raise ValueError('not a JSON object')
        except ValueError as exc:
            self._refuse(f'sim/object_poses message is not a JSON object ({cut(str(exc))}); '
                         'ignored')
            return
        if self.use_image_stamp:
            self._pending = data
            return
        try:
            stamp = state_stamp(data.get('stamp'))
        except ValueError as exc:
            self._refuse(f'sim/object_poses: {exc}')
            return
        self._answer(data, stamp)

    def _refuse(self, text: str) -> None:
        """Count a state not acted on and say why (throttled: a peer may send thousands)."""
        self.refused_states += 1
        self.get_logger().warning(text, throttle_duration_sec=WARN_EVERY)

    def _on_image(self, msg: Image) -> None:
        if self._pending is None:
            self.get_logger().warning('image before any privileged state; not answered',
                                      throttle_duration_sec=5.0)
            return
        self._answer(self._pending, msg.header.stamp)

    def _answer(self, data: dict, stamp: Time) -> None:
        if self.expert is None and isinstance(data.get('language'), str):
            self.get_logger().info('no instruction received yet; using the language in the '
                                   'privileged state')
            self._set_instruction(data['language'].strip())
        if self.expert is None:
            self.get_logger().warning('no usable instruction yet; state not answered',
                                      throttle_duration_sec=5.0)
            return
        try:
            state = SceneState.from_dict(data)
        except ValueError as exc:
            self._refuse(f'bad privileged state: {exc}')
            return
        key, step = episode_key(data), data.get('step')
        if step is not None and type(step) is not int:
            self._refuse(f'bad privileged state: step {cut(step)}; expected an integer')
            return
        if key != self._episode or (step is not None and self._last_step is not None
                                    and step < self._last_step):
            self.expert.reset()
            self._episode, self._last_chunk = key, None
            suite, task_id, episode, init_state = key
            self.get_logger().info(f'new episode: {suite} task {task_id} episode {episode} '
                                   f'init_state {init_state}')
        elif step is not None and step == self._last_step and self._last_chunk is not None:
            self._publish(self._last_chunk, stamp)   # republished observation: same answer
            return
        elif (step is not None and self._last_step is not None and self._last_chunk is not None
              and step - self._last_step != len(self._last_chunk)):
            self.get_logger().warning(
                f'step {step}: {step - self._last_step} steps since the last chunk of '
                f'{len(self._last_chunk)}; the expert plans from where its whole chunk ends: '
                'run the bridge with observation_interval 0', throttle_duration_sec=WARN_EVERY)
        phase = self.expert.phase
        try:
            chunk = self.expert.act(state)
        except ValueError as exc:
            self.refused_states += 1
            self.get_logger().error(f'expert cannot act: {exc}', throttle_duration_sec=WARN_EVERY)
            return
        if not np.isfinite(chunk).all():
            self._refuse(f'step {step}: the expert computed non-finite actions from this state; '
                         'not published')
            return
        if self.expert.phase != phase:
            self.get_logger().info(f'step {step}: {phase.value} -> {self.expert.phase.value}')
        self._last_step, self._last_chunk = step, chunk
        self._publish(chunk, stamp)

    def _publish(self, chunk: np.ndarray, stamp: Time) -> None:
        self.chunk_pub.publish(chunk_trajectory(chunk, stamp, self.action_names, self.period,
                                                self.frame_id))
        self.chunks_published += 1


def main(args: list[str] | None = None) -> int:
    """Spin the libero_expert node until shutdown; 2 on bad parameters."""
    try:
        with rclpy.init(args=args):
            try:
                node = ExpertNode()
            except ValueError as exc:
                rclpy.logging.get_logger('libero_expert').error(str(exc))
                return 2
            try:
                rclpy.spin(node)
            except RuntimeError:       # rclpy's RCLError: a signal shut the context down
                if node.context.ok():  # while the executor built its wait set
                    raise
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
