"""What the sim bridge sends and receives, built from plain numbers: no node, no publishers.

In: `action_chunk` (JointTrajectory -> `ChunkMessage` for the executors) and `policy_stats`
(JSON objects, aggregated per episode). Out: the camera image (sensor_msgs/Image rgb8), joint
states, the privileged state on `sim/object_poses` (the JSON object the scripted expert parses
with `SceneState.from_dict`), `/diagnostics` and the `episode_result` record. Stamps are
integer ns on the ROS clock; poses in LIBERO's world frame (m, quaternions xyzw).
"""

import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory

from rsd_ros.topics import time_msg, unpack_chunk
from sim_bridge.chunk_executor import ChunkMessage, ExecutorCounters, percentile_summary
from sim_bridge.libero_env import LiberoTask, Observation, RobotState


def chunk_message(msg: JointTrajectory, received_ns: int) -> ChunkMessage:
    """JointTrajectory -> plain numbers for the executor (unpacked as the topic contract
    packs them); `received_ns`: arrival time, ns."""
    stamp, names, positions, times = unpack_chunk(msg)
    return ChunkMessage(stamp_ns=stamp, joint_names=names, positions=positions,
                        time_from_start=times, received_ns=received_ns)


def image_msg(image: np.ndarray, stamp_ns: int, frame_id: str) -> Image:
    """[H, W, 3] uint8 RGB -> sensor_msgs/Image (rgb8, tight rows)."""
    height, width, _ = image.shape
    msg = Image(height=height, width=width, encoding='rgb8', is_bigendian=0, step=width * 3)
    msg.header.stamp = time_msg(stamp_ns)
    msg.header.frame_id = frame_id
    msg.data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return msg


def joint_state_msg(task: LiberoTask, robot: RobotState, stamp_ns: int) -> JointState:
    """Arm joints then gripper fingers: positions (rad, m), velocities (rad/s; fingers 0)."""
    joints = JointState(name=task.joint_names + task.gripper_joint_names,
                        position=[float(v) for v in (*robot.joint_pos, *robot.gripper_qpos)],
                        velocity=[float(v) for v in robot.joint_vel] + [0.0, 0.0])
    joints.header.stamp = time_msg(stamp_ns)
    return joints


def pose_list(pos: np.ndarray, quat: np.ndarray) -> list[float]:
    """[x, y, z, qx, qy, qz, qw] rounded to 0.1 mm / 1e-6."""
    return [round(float(v), 6) for v in (*pos, *quat)]


def privileged_state(task: LiberoTask, obs: Observation, stamp_ns: int,
                     episode: int) -> dict[str, Any]:
    """The `sim/object_poses` JSON object: task and episode, step, every object's world pose,
    the hand (grip site, quat xyzw, finger joints, last gripper command) and the arm joints."""
    robot = obs.robot
    stamp = time_msg(stamp_ns)
    return {
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


def diagnostics_msg(name: str, status: dict[str, Any], values: dict[str, Any],
                    ) -> DiagnosticArray:
    """One DiagnosticStatus (unstamped array): `status['state']` as the message, WARN while
    waiting for or republishing to the policy, ERROR when failed; status and values as
    key/value strings."""
    level = DiagnosticStatus.OK
    if status['state'] in ('waiting for policy', 'republishing'):
        level = DiagnosticStatus.WARN
    elif status['state'] == 'failed':
        level = DiagnosticStatus.ERROR
    array = DiagnosticArray()
    array.status = [DiagnosticStatus(
        level=level, name=name, hardware_id='libero_sim', message=status['state'],
        values=[KeyValue(key=str(k), value=str(v)) for k, v in {**status, **values}.items()])]
    return array


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


def episode_record(task: LiberoTask, init_state: int, episode: int, max_steps: int, *,
                   seed: int, mode: str, wall_s: float, counters: ExecutorCounters, extra: dict,
                   timing: dict, policy_stats: list[dict]) -> dict[str, Any]:
    """The `episode_result` record of a finished episode.

    wall_s: s the episode took; counters, extra: what its executor and scheduler counted;
    timing: {'render_s', 'renders', 'physics_s'} (s and count); policy_stats: the messages
    received during the episode.
    """
    return {
        'suite': task.suite, 'task_id': task.task_id, 'task': task.task_name,
        'instruction': task.language, 'init_state': init_state, 'episode': episode,
        'seed': seed, 'mode': mode, 'success': task.success,
        'max_steps': max_steps, 'sim_time_s': round(task.sim_time, 3),
        'wall_time_s': round(wall_s, 3),
        'latency_ms': percentile_summary(counters.latencies),
        'latencies_ms': [round(v * 1e3, 3) for v in counters.latencies],
        **counters.as_dict(), **extra,   # steps, held_steps, skipped_steps, ...
        'observations': timing['renders'] + 1,
        'render_ms_mean': round(1e3 * timing['render_s'] / max(timing['renders'], 1), 3),
        'physics_ms_mean': round(1e3 * timing['physics_s'] / max(task.steps, 1), 3),
        'policy_stats': aggregate_policy_stats(policy_stats),
        'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }
