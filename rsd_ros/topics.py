"""The topic contract between the policy side and the simulator (or robot) side.

One home for the facts both sides must agree on: topic names (relative, so namespaces and
remapping work), their QoS profiles, the action dimension names of LIBERO's OSC_POSE
controller, how an action chunk is packed into a trajectory_msgs/JointTrajectory and read
back, and builtin_interfaces stamps <-> integer nanoseconds. It imports only message types and
rclpy, so the simulator side (sim_bridge) uses it without ever touching the engine.

Packing: joint_names are the action dimension names, one point per chunk step, positions =
the action (action units), time_from_start of point i (0-based) = (i + 1) x control period:
the instant control step i ends, when its target is due. No point sits at 0 s, which
trajectory controllers read as "the current state" rather than a target. header.stamp is the
stamp of the image the chunk was computed from, so `ros2 topic delay action_chunk` is the
camera-to-action latency.
"""

from collections.abc import Sequence

from builtin_interfaces.msg import Duration, Time
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

# Topic names, relative unless global by nature.
CAMERA = 'camera/image_raw'           # sensor_msgs/Image, camera or bridge -> policy
INSTRUCTION = 'instruction'           # std_msgs/String, operator or bridge -> policy
JOINT_STATES = 'joint_states'         # sensor_msgs/JointState, robot or bridge -> policy
ACTION_CHUNK = 'action_chunk'         # trajectory_msgs/JointTrajectory, policy -> arm
POLICY_STATS = 'policy_stats'         # std_msgs/String, one JSON object per chunk
DIAGNOSTICS = '/diagnostics'          # diagnostic_msgs/DiagnosticArray
EPISODE_RESULT = 'episode_result'     # std_msgs/String, one JSON object per episode
OBJECT_POSES = 'sim/object_poses'     # std_msgs/String, privileged sim state (expert only)

# Sensor streams: only the newest sample matters; a late one is worth less than none.
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                        reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)
# The task: reliable and latched, so a node started late still gets the instruction in force.
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Commands: the newest chunk, delivered.
CHUNK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.RELIABLE)
# Statistics and diagnostics: reliable, a short backlog.
STATS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                       reliability=ReliabilityPolicy.RELIABLE)
# Episode results: reliable and latched (an evaluator that connects late still reads them).
RESULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Privileged object poses, one per observation.
POSES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.RELIABLE)

# LIBERO's OSC_POSE action: hand translation, rotation (world frame), gripper.
LIBERO_ACTION_NAMES = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')


def duration(seconds: float) -> Duration:
    """Seconds (>= 0) -> builtin_interfaces/Duration, rounded to the nanosecond."""
    total = round(seconds * 1e9)
    return Duration(sec=total // 1_000_000_000, nanosec=total % 1_000_000_000)


def time_msg(stamp_ns: int) -> Time:
    """Integer nanoseconds (>= 0) -> builtin_interfaces/Time."""
    return Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def stamp_ns(stamp: Time) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def pack_chunk(positions: Sequence[Sequence[float]], stamp: Time, frame_id: str,
               joint_names: Sequence[str], control_period: float) -> JointTrajectory:
    """A chunk [T][A] (action units) -> JointTrajectory, point i at (i + 1) x control_period
    (s). ValueError if a row's length differs from the names'."""
    rows = [[float(x) for x in row] for row in positions]
    if any(len(row) != len(joint_names) for row in rows):
        raise ValueError(f'{len(joint_names)} joint names for rows of '
                         f'{sorted({len(row) for row in rows})} values')
    msg = JointTrajectory(joint_names=list(joint_names))
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.points = [JointTrajectoryPoint(positions=row,
                                       time_from_start=duration((i + 1) * control_period))
                  for i, row in enumerate(rows)]
    return msg


Unpacked = tuple[int, tuple[str, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]


def unpack_chunk(msg: JointTrajectory) -> Unpacked:
    """JointTrajectory -> (stamp ns, joint names, positions [T][A], time_from_start [T] s), as
    plain numbers, unvalidated (the receiver decides what it accepts)."""
    return (stamp_ns(msg.header.stamp), tuple(msg.joint_names),
            tuple(tuple(float(x) for x in point.positions) for point in msg.points),
            tuple(point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
                  for point in msg.points))
