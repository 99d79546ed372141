"""The sim bridge node over real DDS with real LIBERO: a tiny in-test node plays the policy.

The bridge and the playing node live in different rclpy contexts (two DDS participants). One
LIBERO scene is built per module and handed to each bridge.
"""

import json
import threading
import time

import numpy as np
import pytest

from sim_bridge.chunk_executor import EXECUTION_HORIZON

NAMES = ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
UP = [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, -1.0]   # raise the hand ~0.5 cm per step
PERIOD_NS = 50_000_000  # control period, ns


@pytest.fixture(scope='module')
def task():
    from sim_bridge.libero_env import LiberoTask

    scene = LiberoTask('libero_spatial', task_id=0, camera_size=64)
    yield scene
    scene.close()


@pytest.fixture
def policy_context():
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


# --- the LIBERO wrapper ------------------------------------------------------------------------

def test_reset_is_reproducible_after_other_episodes(task):
    actions = np.random.default_rng(0).uniform(-1, 1, (12, 7))

    def rollout(init_state):
        task.reset(init_state)
        for action in actions:
            task.step(action)
        return task.env.get_sim_state().copy()

    first = rollout(2)
    rollout(5)                       # another episode in between (gripper closed at times)
    np.testing.assert_array_equal(rollout(2), first)
    assert task.steps == 12 and task.sim_time == pytest.approx(0.6)


def test_observation_is_libero_camera_image_upright_from_any_thread(task):
    from sim_bridge.libero_env import rotate_180

    obs = task.reset(0)
    assert obs.image.shape == (64, 64, 3) and obs.image.dtype == np.uint8
    assert obs.step == 0 and obs.robot.joint_pos.shape == (7,)
    env = task.env.env
    env.modify_observable('agentview_image', 'enabled', True)
    try:
        context = task._gl_context()
        context.make_current()
        raw = env._get_observations(force_update=True)['agentview_image']
    finally:
        from sim_bridge.libero_env import _release_gl

        _release_gl(context)
        env.modify_observable('agentview_image', 'enabled', False)
    np.testing.assert_array_equal(obs.image, rotate_180(raw))
    rendered = {}
    worker = threading.Thread(target=lambda: rendered.setdefault('image', task.render()))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(rendered['image'], obs.image)   # not a black frame


def test_object_poses_are_world_poses_with_unit_quaternions(task):
    task.reset(0)
    poses = task.object_poses()
    assert {'akita_black_bowl_1', 'plate_1', 'wooden_cabinet_1', 'main_table_plate_region'} \
        <= set(poses)
    for pos, quat in poses.values():
        assert pos.shape == (3,) and quat.shape == (4,)
        assert np.linalg.norm(quat) == pytest.approx(1.0, abs=1e-6)
    assert 0.85 < poses['plate_1'][0][2] < 1.0          # on the table top
    with pytest.raises(ValueError, match='init_state 50 out of range'):
        task.reset(50)
    with pytest.raises(ValueError, match='non-finite'):
        task.step([0.0] * 6 + [float('nan')])


# --- the bridge node ---------------------------------------------------------------------------

def trajectory(stamp, names=NAMES, points=8, action=UP):
    from builtin_interfaces.msg import Duration
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    msg = JointTrajectory(joint_names=list(names))
    msg.header.stamp = stamp
    for k in range(points):
        nanos = (k + 1) * PERIOD_NS
        msg.points.append(JointTrajectoryPoint(
            positions=[float(v) for v in action],
            time_from_start=Duration(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)))
    return msg


def stamp_ns(stamp):
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class PlayedPolicy:
    """Answers each camera image with `answer(index, image_msg)` (a JointTrajectory or None),
    after `delay` s; records images, object poses, joint states and episode results."""

    def __init__(self, context, answer, delay=0.0, name='played_policy'):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from rsd_ros.topics import CHUNK_QOS, POSES_QOS, RESULT_QOS, SENSOR_QOS

        self.answer, self.delay = answer, delay
        self.images, self.poses, self.joints, self.results, self.answered = [], [], [], [], []
        self.node = Node(name, context=context)
        self.chunk_pub = self.node.create_publisher(JointTrajectory, 'action_chunk', CHUNK_QOS)
        self.stats_pub = self.node.create_publisher(String, 'policy_stats', 10)
        self.node.create_subscription(Image, 'camera/image_raw', self._on_image, SENSOR_QOS)
        self.node.create_subscription(String, 'sim/object_poses',
                                      lambda m: self.poses.append(json.loads(m.data)), POSES_QOS)
        self.node.create_subscription(JointState, 'joint_states', self.joints.append, SENSOR_QOS)
        self.node.create_subscription(String, 'episode_result',
                                      lambda m: self.results.append(m.data), RESULT_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def _on_image(self, msg):
        from std_msgs.msg import String

        self.images.append(msg)
        reply = self.answer(len(self.images) - 1, msg)
        if reply is None:
            return
        if self.delay:
            time.sleep(self.delay)   # a slow policy
        stats = {'total_ms': 10.0, 'layers_proposed': 3, 'layers_accepted': 2}
        self.stats_pub.publish(String(data=json.dumps(stats)))
        self.chunk_pub.publish(reply)
        self.answered.append(stamp_ns(msg.header.stamp))

    def destroy(self):
        self.executor.remove_node(self.node)
        self.node.destroy_node()


def start_bridge(context, task, tmp_path, **params):
    """A bridge node on `task` with its executor spinning in a thread."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from sim_bridge.bridge_node import LiberoBridge

    params = {'results_file': str(tmp_path / 'results.jsonl'), 'chunk_timeout': 5.0, **params}
    bridge = LiberoBridge(task=task, context=context,
                          parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(bridge)
    spinner = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.05)
                                               for _ in iter(bridge.finished.is_set, True)])
    bridge.start()
    spinner.start()
    return bridge, spinner


def spin_until_finished(bridge, spinner, policy, timeout=90.0, during=None):
    deadline = time.monotonic() + timeout
    while not bridge.finished.is_set() and time.monotonic() < deadline:
        if during is not None:
            policy = during(policy) or policy
        policy.executor.spin_once(timeout_sec=0.05)
    finished = bridge.finished.is_set()
    bridge.stop()
    spinner.join(5.0)
    end = time.monotonic() + 1.0   # let the last episode_result arrive
    while time.monotonic() < end:
        policy.executor.spin_once(timeout_sec=0.05)
    bridge.destroy_node()
    assert finished, f'bridge did not finish within {timeout} s'
    assert bridge.exit_code == 0
    return policy


def read_results(tmp_path):
    return [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]


def test_lockstep_episodes_through_dds(task, ros_context, policy_context, tmp_path):
    policy = PlayedPolicy(policy_context, lambda i, image: trajectory(image.header.stamp))
    bridge, spinner = start_bridge(ros_context, task, tmp_path, max_steps=16, episodes=2,
                                   init_state=3)   # the default execution horizon
    spin_until_finished(bridge, spinner, policy)

    records = read_results(tmp_path)
    assert [r['init_state'] for r in records] == [3, 4]
    chunks = 16 // EXECUTION_HORIZON   # each chunk's first EXECUTION_HORIZON points run
    for record in records:
        assert (record['steps'], record['executed_chunks'], record['held_steps']) == \
            (16, chunks, 0)
        assert (record['rejected_chunks'], record['mode'], record['success']) == \
            (0, 'lockstep', False)
        assert record['latency_ms']['n'] == chunks and record['latency_ms']['p50'] > 0
        assert record['instruction'] == task.language
        stats = record['policy_stats']
        assert stats['chunks'] >= 1 and stats['sums']['layers_proposed'] == 3 * stats['chunks']
    assert [json.loads(r) for r in policy.results] == records

    # One observation per chunk (plus any republished after a lost first frame), each
    # answered by its own stamp; poses carry the same stamps.
    assert len(policy.images) == 2 * chunks + sum(r['republished_observations'] for r in records)
    stamps = [stamp_ns(image.header.stamp) for image in policy.images]
    assert stamps == sorted(set(stamps)) and policy.answered == stamps
    for image in policy.images:
        assert (image.encoding, image.header.frame_id) == ('rgb8', 'agentview')
        assert (image.height, image.width, image.step, len(image.data)) == (64, 64, 192, 64 * 192)
        assert np.frombuffer(bytes(image.data), np.uint8).mean() > 20   # not a black frame
    pose_stamps = [p['stamp']['sec'] * 1_000_000_000 + p['stamp']['nanosec']
                   for p in policy.poses]
    assert pose_stamps == stamps
    assert {'akita_black_bowl_1', 'plate_1'} <= set(policy.poses[0]['objects'])
    from sim_bridge.expert import SceneState  # the expert node's reading of the same JSON

    state = SceneState.from_dict(policy.poses[0])
    assert state.position('plate_1').shape == (3,)
    assert policy.joints and len(policy.joints[0].name) == 9

    # The chunks were executed: the hand rose during the last episode.
    first_of_last = [p for p in policy.poses if p['episode'] == 1][0]
    rise = task.robot_state().eef_pos[2] - first_of_last['eef_pos'][2]
    assert rise > 0.03


def test_temporal_ensemble_without_overlapping_chunks_is_refused(task, ros_context):
    from rclpy.parameter import Parameter

    from sim_bridge.bridge_node import LiberoBridge

    for params in ({'mode': 'realtime'}, {'observation_interval': 0}):
        overrides = [Parameter(k, value=v)
                     for k, v in {'temporal_ensemble': True, **params}.items()]
        with pytest.raises(ValueError, match='temporal_ensemble needs mode lockstep'):
            LiberoBridge(task=task, context=ros_context, parameter_overrides=overrides)


def test_malformed_chunks_are_rejected_and_the_arm_holds(task, ros_context, policy_context,
                                                         tmp_path, capfd):
    push = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]   # would move the hand ~8 cm if executed
    swapped = ['dy', 'dx'] + NAMES[2:]

    def answer(index, image):
        if index == 0:
            return trajectory(image.header.stamp, points=7, action=push)
        msg = trajectory(image.header.stamp, action=push, points=1000 if index == 3 else 8)
        if index == 1:
            msg.points[2].positions[0] = float('nan')
        elif index == 2:
            msg.points[5].positions[1] = 1e300            # finite in float64, inf in float32
        elif index == 4:
            msg.points[3].time_from_start = msg.points[2].time_from_start   # not increasing
        elif index > 4:
            msg.joint_names = swapped
        return msg

    policy = PlayedPolicy(policy_context, answer)
    bridge, spinner = start_bridge(ros_context, task, tmp_path, max_steps=48,
                                   observation_interval=0)   # a hold lasts a whole chunk
    spin_until_finished(bridge, spinner, policy)

    (record,) = read_results(tmp_path)
    assert (record['rejected_chunks'], record['executed_chunks']) == (6, 0)
    assert (record['held_steps'], record['steps']) == (48, 48)
    moved = np.linalg.norm(task.robot_state().eef_pos - np.array(policy.poses[0]['eef_pos']))
    assert moved < 0.005
    log = capfd.readouterr()
    text = log.out + log.err
    assert text.count('rejected action chunk') == 6
    for reason in ('7 points; expected 8', 'non-finite', 'beyond float32) in points [5]',
                   '1000 points; expected 8', 'strictly increasing', 'joint_names'):
        assert reason in text


def test_bridge_survives_a_policy_restart(task, ros_context, policy_context, tmp_path):
    answer = lambda i, image: trajectory(image.header.stamp)  # noqa: E731
    first = PlayedPolicy(policy_context, lambda i, image: answer(i, image) if i == 0 else None)
    state = {'restarted_at': None}

    def restart(policy):
        if state['restarted_at'] is None and len(policy.images) >= 2:
            policy.destroy()                       # the policy dies before its second answer
            state['restarted_at'] = time.monotonic()
            return None
        if state['restarted_at'] is not None and policy is first and \
                time.monotonic() - state['restarted_at'] > 1.5:
            return PlayedPolicy(policy_context, answer, name='played_policy_2')
        return None

    bridge, spinner = start_bridge(ros_context, task, tmp_path, max_steps=24, chunk_timeout=1.0,
                                   observation_interval=0)
    second = spin_until_finished(bridge, spinner, first, during=restart)

    assert second is not first
    (record,) = read_results(tmp_path)
    assert (record['steps'], record['executed_chunks'], record['held_steps']) == (24, 3, 0)
    assert record['republished_observations'] >= 1


def test_realtime_slow_policy_costs_skipped_and_held_steps(task, ros_context, policy_context,
                                                           tmp_path):
    policy = PlayedPolicy(policy_context, lambda i, image: trajectory(image.header.stamp),
                          delay=0.3)
    bridge, spinner = start_bridge(ros_context, task, tmp_path, mode='realtime', max_steps=40,
                                   observation_interval=0)
    spin_until_finished(bridge, spinner, policy)

    (record,) = read_results(tmp_path)
    assert (record['steps'], record['mode']) == (40, 'realtime')
    assert record['skipped_steps'] > 0 and record['held_steps'] > 0
    assert record['latency_ms']['p50'] >= 300.0   # at least the policy's sleep
    assert record['real_time_factor'] > 0
    # Every image was answered, later than its stamp by at least the policy's sleep.
    assert len(policy.images) >= 3 and policy.answered == [stamp_ns(image.header.stamp)
                                                            for image in policy.images]
