"""The sim bridge's messages from plain numbers, without a node or LIBERO."""

import json
from types import SimpleNamespace

from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import pytest
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from rsd_ros.topics import stamp_ns as stamp_ns_of
from rsd_ros.topics import time_msg
from sim_bridge.bridge_messages import (
    aggregate_policy_stats,
    chunk_message,
    diagnostics_msg,
    episode_record,
    image_msg,
    joint_state_msg,
    privileged_state,
)
from sim_bridge.chunk_executor import ExecutorCounters
from sim_bridge.expert import SceneState
from sim_bridge.libero_env import Observation, RobotState

STAMP_NS = 12_345_000_007


def fake_task():
    """What the messages read of a LiberoTask."""
    poses = {'plate_1': (np.array([0.1, 0.2, 0.9]), np.array([0.0, 0.0, 0.0, 1.0])),
             'akita_black_bowl_1': (np.array([0.3, 0.1, 0.9123456789]),
                                    np.array([0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)]))}
    return SimpleNamespace(
        suite='libero_spatial', task_id=3, task_name='task_3', language='pick up the bowl',
        init_state=5, last_gripper=-1.0, success=True, steps=40, sim_time=2.0,
        joint_names=[f'joint{i}' for i in range(1, 8)],
        gripper_joint_names=['finger1', 'finger2'], object_poses=lambda: poses)


def observation(step=8):
    robot = RobotState(eef_pos=np.array([-0.2, 0.0, 1.17]), eef_quat=np.array([1.0, 0, 0, 0]),
                       gripper_qpos=np.array([0.039, -0.039]), joint_pos=np.arange(7) * 0.1,
                       joint_vel=np.ones(7))
    return Observation(image=np.zeros((4, 6, 3), np.uint8), robot=robot, step=step,
                       sim_time=step * 0.05)


def test_stamps_round_trip():
    stamp = time_msg(STAMP_NS)
    assert (stamp.sec, stamp.nanosec) == (12, 345_000_007)
    assert stamp_ns_of(stamp) == STAMP_NS


def test_chunk_message_takes_the_numbers_of_a_trajectory():
    msg = JointTrajectory(joint_names=['a', 'b'])
    msg.header.stamp = Time(sec=12, nanosec=345_000_007)
    for k in range(2):
        offset = Duration(sec=0, nanosec=(k + 1) * 50_000_000)
        msg.points.append(JointTrajectoryPoint(positions=[float(k), 2.0 * k],
                                               time_from_start=offset))
    chunk = chunk_message(msg, received_ns=STAMP_NS + 7)
    assert (chunk.stamp_ns, chunk.received_ns, chunk.joint_names) == (STAMP_NS, STAMP_NS + 7,
                                                                     ('a', 'b'))
    assert chunk.positions == ((0.0, 0.0), (1.0, 2.0))
    assert chunk.time_from_start == pytest.approx((0.05, 0.1))


def test_image_and_joint_states_carry_the_stamp():
    obs = observation()
    image = image_msg(obs.image, STAMP_NS, 'agentview')
    assert (image.height, image.width, image.step, image.encoding) == (4, 6, 18, 'rgb8')
    assert len(image.data) == 72 and image.header.frame_id == 'agentview'
    joints = joint_state_msg(fake_task(), obs.robot, STAMP_NS)
    assert len(joints.name) == len(joints.position) == len(joints.velocity) == 9
    assert joints.position[-2:] == pytest.approx([0.039, -0.039])
    assert list(joints.velocity[-2:]) == [0.0, 0.0]
    assert stamp_ns_of(joints.header.stamp) == stamp_ns_of(image.header.stamp) == STAMP_NS


def test_privileged_state_is_json_the_expert_parses():
    state = json.loads(json.dumps(privileged_state(fake_task(), observation(), STAMP_NS, 2)))
    assert state['stamp'] == {'sec': 12, 'nanosec': 345_000_007}
    assert (state['episode'], state['step'], state['init_state']) == (2, 8, 5)
    assert state['objects']['akita_black_bowl_1'][2] == 0.912346   # rounded to 1e-6
    scene = SceneState.from_dict(state)
    assert scene.position('plate_1').tolist() == [0.1, 0.2, 0.9]
    assert scene.eef_quat.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_policy_stats_aggregate_numeric_fields_only():
    stats = aggregate_policy_stats([{'total_ms': 10.0, 'ok': True, 'mode': 'x'},
                                    {'total_ms': 20.0, 'layers': 3}])
    assert stats['chunks'] == 2 and stats['sums'] == {'total_ms': 30.0, 'layers': 3.0}
    assert stats['means'] == {'total_ms': 15.0, 'layers': 3.0}
    assert stats['last'] == {'total_ms': 20.0, 'layers': 3}
    assert aggregate_policy_stats([]) is None


@pytest.mark.parametrize('state, level', [
    ('running', DiagnosticStatus.OK), ('waiting for policy', DiagnosticStatus.WARN),
    ('republishing', DiagnosticStatus.WARN), ('failed', DiagnosticStatus.ERROR)])
def test_diagnostics_level_follows_the_state(state, level):
    array = diagnostics_msg('libero_bridge: sim', {'state': state, 'step': 3}, {'mode': 'x'})
    (status,) = array.status
    assert (status.level, status.message, status.hardware_id) == (level, state, 'libero_sim')
    assert {v.key: v.value for v in status.values} == {'state': state, 'step': '3',
                                                       'mode': 'x'}


def test_episode_record_derives_means_and_latencies():
    counters = ExecutorCounters(steps=40, held_steps=2, executed_chunks=5, latencies=[0.1, 0.3])
    record = episode_record(fake_task(), 5, 1, 220, seed=0, mode='realtime', wall_s=2.5,
                            counters=counters, extra={'real_time_factor': 0.8},
                            timing={'render_s': 0.4, 'renders': 4, 'physics_s': 0.2},
                            policy_stats=[{'total_ms': 10.0}])
    assert (record['task_id'], record['init_state'], record['episode']) == (3, 5, 1)
    assert (record['steps'], record['held_steps'], record['success']) == (40, 2, True)
    assert record['latencies_ms'] == [100.0, 300.0] and record['latency_ms']['n'] == 2
    assert (record['observations'], record['render_ms_mean']) == (5, 100.0)
    assert record['physics_ms_mean'] == 5.0 and record['real_time_factor'] == 0.8
    assert record['policy_stats']['chunks'] == 1 and 'latencies' not in record
