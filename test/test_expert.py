"""The scripted libero_spatial expert: geometry, phase machine (toy world), LIBERO, ROS node."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from sim_bridge.expert import (
    CHUNK_LEN,
    R_DOWN,
    Box,
    ExpertConfig,
    Goal,
    Grasp,
    Phase,
    SceneState,
    SpatialExpert,
    hand_yaw,
    hand_yaw_target,
    matrix_from_rotvec,
    obstacle_boxes,
    parse_bddl_goal,
    plan_grasp,
    quat_to_matrix,
    rot_z,
    rotvec_from_matrix,
)

GOAL = Goal('akita_black_bowl_1', 'plate_1')
UPRIGHT_YAW90 = [0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)]   # xyzw, how LIBERO places the bowls


def scene(**extra) -> SceneState:
    """A libero_spatial-like table: bowl, plate, hand above the table, open."""
    poses = {
        'akita_black_bowl_1': np.array([-0.06, 0.20, 0.898, *UPRIGHT_YAW90]),
        'plate_1': np.array([0.06, 0.20, 0.9025, *UPRIGHT_YAW90]),
        **{name: np.asarray(pose, dtype=np.float64) for name, pose in extra.items()},
    }
    return SceneState(eef_pos=np.array([-0.2, 0.0, 1.17]), eef_quat=np.array([1.0, 0, 0, 0]),
                      gripper_qpos=np.array([0.039, -0.039]), poses=poses)


# ------------------------------------------------------------------ geometry

def test_parse_bddl_goal():
    text = """(define (problem LIBERO_Tabletop_Manipulation)
      (:objects akita_black_bowl_1 akita_black_bowl_2 - akita_black_bowl plate_1 - plate)
      (:init (On akita_black_bowl_1 main_table_between_plate_ramekin_region))
      (:goal
        (And (On akita_black_bowl_1 plate_1))
      ))"""
    assert parse_bddl_goal(text) == GOAL
    with pytest.raises(ValueError, match='goal'):
        parse_bddl_goal('(define (problem x) (:init (On a b)))')


def test_rotation_helpers():
    assert np.allclose(quat_to_matrix([1.0, 0, 0, 0]), R_DOWN)
    rng = np.random.default_rng(0)
    for angle in (1e-8, 0.3, 2.0, np.pi - 1e-6):
        axis = rng.normal(size=3)
        rotvec = angle * axis / np.linalg.norm(axis)
        back = rotvec_from_matrix(matrix_from_rotvec(rotvec))
        assert np.allclose(matrix_from_rotvec(back), matrix_from_rotvec(rotvec), atol=1e-6)
    assert hand_yaw(rot_z(0.7) @ R_DOWN) == pytest.approx(0.7)


def test_hand_yaw_target_folds_half_turns_into_the_wrist_range():
    for yaw in np.linspace(-7, 7, 57):
        folded = hand_yaw_target(yaw)
        assert -np.pi / 2 <= folded <= np.pi / 2
        assert np.sin(folded - yaw) == pytest.approx(0.0, abs=1e-9)   # same up to k pi


def test_grasp_site_puts_the_fingers_across_the_wall():
    bowl, rot = np.array([0.1, 0.2, 0.9]), quat_to_matrix(UPRIGHT_YAW90)
    for angle in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        site, yaw = Grasp(angle=angle, height=0.03, inset=0.01).site(bowl, rot, 0.045)
        radial = site[:2] - bowl[:2]
        assert np.linalg.norm(radial) == pytest.approx(0.035)          # wall radius - inset
        assert site[2] == pytest.approx(0.93)
        finger_axis = (rot_z(yaw) @ np.array([0.0, 1.0, 0.0]))[:2]      # hand local y
        assert abs(finger_axis @ radial / np.linalg.norm(radial)) == pytest.approx(1.0)


def test_box_signed_distance():
    box = Box.from_bounds([1.0, 0.0, 0.0], rot_z(np.pi / 2), [-0.1, -0.2, 0.0], [0.1, 0.2, 0.1])
    points = np.array([[1.0, 0.0, 0.05], [1.0, 0.25, 0.05], [1.25, 0.0, 0.05],
                       [1.15, 0.0, 0.05]])
    distance = box.distance(points)
    assert distance[0] == pytest.approx(-0.05)   # inside, 5 cm from the top and bottom
    assert distance[1] == pytest.approx(0.15)    # rotated: the short side lies along y
    assert distance[2] == pytest.approx(0.05)    # and the long one along x
    assert distance[3] == pytest.approx(-0.05)
    assert box.top == pytest.approx(0.1)


def test_grasp_avoids_a_neighbour():
    for side in (1.0, -1.0):
        state = scene(glazed_rim_porcelain_ramekin_1=[-0.06, 0.20 + side * 0.10, 0.899,
                                                       *UPRIGHT_YAW90])
        grasp = plan_grasp(state, GOAL, ExpertConfig())
        site, _ = grasp.site(state.position(GOAL.obj), state.rotation(GOAL.obj), 0.045)
        assert grasp.clearance >= ExpertConfig().min_clearance
        assert side * (site[1] - 0.20) < 0.02, 'the outer finger went next to the ramekin'


def test_bowl_in_a_drawer_is_grasped_away_from_the_cabinet():
    yaw = np.radians(155.0)
    cabinet = [0.036, -0.263, 0.905, 0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)]
    state = scene(wooden_cabinet_1=cabinet,
                  wooden_cabinet_1_top_region=[0.091, -0.129, 1.091, 0, 0, 0, 1.0],
                  akita_black_bowl_2=[0.018, -0.278, 1.126, *UPRIGHT_YAW90])
    state.poses[GOAL.obj] = np.array([0.085, -0.13, 1.063, *UPRIGHT_YAW90])
    names = [box.name for box in obstacle_boxes(state, GOAL)]
    assert names.count('wooden_cabinet_1_top_region_wall') == 4
    grasp = plan_grasp(state, GOAL, ExpertConfig())
    bowl = state.position(GOAL.obj)
    site, _ = grasp.site(bowl, state.rotation(GOAL.obj), 0.045)
    towards_cabinet = np.array(cabinet[:2]) - bowl[:2]
    assert (site[:2] - bowl[:2]) @ towards_cabinet < 0.0


def test_scene_state_from_dict_names_what_is_wrong():
    good = {'objects': {'plate_1': [0, 0, 0, 0, 0, 0, 1]}, 'eef_pos': [0, 0, 1],
            'eef_quat': [1, 0, 0, 0], 'gripper_qpos': [0.04, -0.04]}
    state = SceneState.from_dict(good)
    assert state.position('plate_1').tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match='eef_quat'):
        SceneState.from_dict({k: v for k, v in good.items() if k != 'eef_quat'})
    with pytest.raises(ValueError, match='plate_1'):
        SceneState.from_dict(dict(good, objects={'plate_1': [0, 0, 0]}))


def test_act_refuses_a_state_without_the_goal_objects():
    state = scene()
    del state.poses['plate_1']
    with pytest.raises(ValueError, match='plate_1'):
        SpatialExpert(GOAL).act(state)


# ------------------------------------------------------------------ phase machine, toy world

class ToyWorld:
    """Kinematic stand-in for LIBERO: the hand follows the expert's own response model, the
    bowl sticks to a closed hand that grips its wall and falls onto what is below when
    released. `slip_at`: the step at which a held bowl is dropped once."""

    def __init__(self, slip_at: int | None = None):
        self.state = scene(glazed_rim_porcelain_ramekin_1=[-0.2, 0.19, 0.899, *UPRIGHT_YAW90])
        self.velocity = np.zeros(3)
        self.width = 0.039
        self.offset = None           # bowl - hand while held
        self.steps = 0
        self.slip_at = slip_at

    @property
    def bowl(self) -> np.ndarray:
        return self.state.poses[GOAL.obj]

    def step(self, action: np.ndarray) -> None:
        cfg = ExpertConfig()
        state = self.state
        self.velocity = cfg.pos_alpha * self.velocity + cfg.pos_beta * action[:3]
        state.eef_pos = state.eef_pos + self.velocity
        rotation = matrix_from_rotvec(action[3:6] * 0.05) @ quat_to_matrix(state.eef_quat)
        state.eef_quat = _matrix_to_quat(rotation)
        self.width = float(np.clip(self.width - 0.005 * np.sign(action[6]), 0.002, 0.039))
        state.gripper_qpos = np.array([self.width, -self.width])
        gap = state.eef_pos - self.bowl[:3]
        if (self.offset is None and self.width < 0.02 and action[6] > 0
                and 0.02 < np.linalg.norm(gap[:2]) < 0.06 and 0.0 < gap[2] < 0.06):
            self.offset = -gap
        if self.offset is not None and (self.width > 0.03 or self.steps == self.slip_at):
            self.offset = None
            plate = state.position('plate_1')
            on_plate = np.linalg.norm(self.bowl[:2] - plate[:2]) < 0.08
            self.bowl[2] = plate[2] + 0.01 if on_plate else 0.898
        if self.offset is not None:
            self.bowl[:3] = state.eef_pos + self.offset
        self.steps += 1


def _matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrix -> xyzw (for the toy world's bookkeeping)."""
    w = np.sqrt(max(0.0, 1.0 + np.trace(m))) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + m[0, 0] - m[1, 1] - m[2, 2])) / 2, m[2, 1] - m[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - m[0, 0] + m[1, 1] - m[2, 2])) / 2, m[0, 2] - m[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - m[0, 0] - m[1, 1] + m[2, 2])) / 2, m[1, 0] - m[0, 1])
    return np.array([x, y, z, w])


def run_toy(world: ToyWorld, expert: SpatialExpert, max_steps: int = 400) -> list[np.ndarray]:
    chunks = []
    while world.steps < max_steps and not expert.done:
        chunk = expert.act(world.state)
        chunks.append(chunk)
        for action in chunk:
            world.step(action)
    return chunks


def test_phase_machine_places_the_bowl_in_a_toy_world():
    world, expert = ToyWorld(), SpatialExpert(GOAL)
    chunks = run_toy(world, expert)
    phases = [phase for _, phase in expert.history]
    assert expert.done, f'expert stopped in {expert.phase}: {expert.history}'
    expected = ['settle', 'approach', 'descend', 'grasp', 'lift', 'carry', 'lower', 'release',
                'retreat', 'done']
    assert [p for p in phases if p in expected] == expected
    plate = world.state.position('plate_1')
    assert np.linalg.norm(world.bowl[:2] - plate[:2]) < 0.02
    assert world.bowl[2] < plate[2] + 0.02
    assert world.steps < 300
    for chunk in chunks:
        assert chunk.shape == (CHUNK_LEN, 7) and chunk.dtype == np.float32
        assert np.abs(chunk).max() <= 1.0
        assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}


def test_a_slipped_bowl_is_grasped_again():
    world = ToyWorld()
    expert = SpatialExpert(GOAL)
    # Run until the bowl is held high, then make it slip.
    while world.offset is None or world.bowl[2] < 0.95:
        for action in expert.act(world.state):
            world.step(action)
        assert world.steps < 300, 'the bowl was never lifted'
    world.slip_at = world.steps
    run_toy(world, expert, max_steps=700)
    phases = [phase for _, phase in expert.history]
    assert 'recover' in phases and phases.count('grasp') == 2, phases
    assert expert.done and expert.attempts == 1
    assert np.linalg.norm(world.bowl[:2] - world.state.position('plate_1')[:2]) < 0.02


def test_settle_waits_until_objects_are_at_rest():
    expert = SpatialExpert(GOAL)
    state = scene()
    for k in range(4):          # the bowl keeps falling: no plan yet
        state.poses[GOAL.obj][2] = 1.0 - 0.02 * k
        chunk = expert.act(state)
        assert expert.phase == Phase.SETTLE
        assert np.abs(chunk[:, :3]).max() < 1e-9 and (chunk[:, 6] == -1).all()
    expert.act(state)           # one chunk at rest
    assert expert.phase == Phase.APPROACH


# ------------------------------------------------------------------ LIBERO

@pytest.fixture(scope='module')
def libero_task():
    from sim_bridge.libero_env import LiberoTask

    with LiberoTask('libero_spatial', task_id=0, camera_size=32) as task:
        yield task


def test_goals_of_every_libero_spatial_task_come_from_the_bddl():
    from sim_bridge.expert import resolve_goal
    from sim_bridge.libero_env import load_suite

    bench = load_suite('libero_spatial')
    for task_id in range(bench.get_num_tasks()):
        language = bench.get_task(task_id).language
        assert resolve_goal(language) == GOAL
        assert resolve_goal('  ' + language.upper() + '. ') == GOAL
    with pytest.raises(ValueError, match='no libero_spatial task'):
        resolve_goal('pick up the red mug')


def test_expert_makes_progress_in_libero(libero_task):
    """Task 0, initial state 0, at most 160 steps: the bowl must at least leave the table."""
    from sim_bridge.collect_demos import rollout

    expert = SpatialExpert(GOAL)
    libero_task.reset(0)
    start_z = libero_task.object_poses()[GOAL.obj][0][2]
    episode = rollout(libero_task, expert, 0, max_steps=160, record=False)
    lifted = 'lift' in [phase for _, phase in expert.history]
    assert episode.success or lifted, f'no progress: {expert.history}'
    if not episode.success:
        assert libero_task.object_poses()[GOAL.obj][0][2] > start_z + 0.03


@pytest.mark.slow
def test_expert_success_rate_over_libero_spatial():
    from sim_bridge.collect_demos import rollout
    from sim_bridge.expert import resolve_goal
    from sim_bridge.libero_env import LiberoTask

    results = {}
    for task_id in range(10):
        with LiberoTask('libero_spatial', task_id=task_id, camera_size=32) as task:
            expert = SpatialExpert(resolve_goal(task.language))
            for init_state in (0, 1):
                episode = rollout(task, expert, init_state, task.horizon, record=False)
                results[task_id, init_state] = episode.success
    rate = np.mean(list(results.values()))
    failed = [key for key, ok in results.items() if not ok]
    assert rate >= 0.85, f'success {rate:.0%}; failed (task, init_state): {failed}'


# ------------------------------------------------------------------ ROS node

def _state_json(state: SceneState, stamp: tuple[int, int], episode: int, step: int) -> str:
    return json.dumps({
        'stamp': {'sec': stamp[0], 'nanosec': stamp[1]}, 'suite': 'libero_spatial',
        'task_id': 0, 'episode': episode, 'init_state': 0, 'step': step,
        'objects': {name: pose.tolist() for name, pose in state.poses.items()},
        'eef_pos': state.eef_pos.tolist(), 'eef_quat': state.eef_quat.tolist(),
        'gripper_qpos': state.gripper_qpos.tolist()})


@pytest.fixture
def expert_link(ros_context):
    """An ExpertNode instructed with task 0 and a peer bridge wired to it: `node`, `chunks` (the
    chunks the peer received), `poses_pub` and `spin_until(done)` (spinning both nodes up to
    20 s); torn down after the test."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from rsd_ros.topics import CHUNK_QOS, INSTRUCTION_QOS, POSES_QOS
    from sim_bridge.expert_node import ExpertNode
    from sim_bridge.libero_env import load_suite

    node = ExpertNode(context=ros_context)
    peer = Node('fake_bridge', context=ros_context)
    chunks = []
    peer.create_subscription(JointTrajectory, 'action_chunk', chunks.append, CHUNK_QOS)
    instruction_pub = peer.create_publisher(String, 'instruction', INSTRUCTION_QOS)
    poses_pub = peer.create_publisher(String, 'sim/object_poses', POSES_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(peer)

    def spin_until(done) -> None:
        deadline = time.monotonic() + 20.0
        while not done() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)

    try:
        instruction_pub.publish(String(data=load_suite('libero_spatial').get_task(0).language))
        spin_until(lambda: node.expert is not None and poses_pub.get_subscription_count() > 0
                   and peer.count_publishers('action_chunk') > 0)
        assert node.goal == GOAL
        yield SimpleNamespace(node=node, chunks=chunks, poses_pub=poses_pub,
                              spin_until=spin_until)
    finally:
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()


def test_expert_node_answers_each_state_with_its_stamp(expert_link, capfd):
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    node, chunks, poses_pub = expert_link.node, expert_link.chunks, expert_link.poses_pub

    def exchange(payload: str, count: int) -> JointTrajectory:
        poses_pub.publish(String(data=payload))
        expert_link.spin_until(lambda: len(chunks) >= count)
        assert len(chunks) == count, 'no action_chunk answered the state'
        return chunks[-1]

    state = scene()
    first = exchange(_state_json(state, (12, 345), episode=0, step=0), 1)
    assert (first.header.stamp.sec, first.header.stamp.nanosec) == (12, 345)
    assert first.joint_names == ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
    assert len(first.points) == CHUNK_LEN
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in first.points]
    assert times == pytest.approx([0.05 * (i + 1) for i in range(CHUNK_LEN)])
    assert [p.positions[6] for p in first.points] == [-1.0] * CHUNK_LEN

    again = exchange(_state_json(state, (13, 0), episode=0, step=0), 2)   # republished
    assert (again.header.stamp.sec, again.header.stamp.nanosec) == (13, 0)
    assert [list(p.positions) for p in again.points] == [list(p.positions)
                                                         for p in first.points]
    steps_before = node.expert.steps
    exchange(_state_json(state, (14, 0), episode=0, step=8), 3)
    assert node.expert.steps == steps_before + CHUNK_LEN
    exchange(_state_json(state, (15, 0), episode=1, step=0), 4)             # new episode
    assert node.expert.steps == CHUNK_LEN

    poses_pub.publish(String(data='not json'))                            # survives
    exchange(_state_json(state, (16, 0), episode=1, step=8), 5)
    assert 'observation_interval 0' not in capfd.readouterr().err          # whole chunks
    exchange(_state_json(state, (17, 0), episode=1, step=12), 6)   # only 4 of 8 points ran
    assert 'run the bridge with observation_interval 0' in capfd.readouterr().err


def test_expert_node_can_take_the_stamp_from_the_image(ros_context):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from rsd_ros.topics import CHUNK_QOS, POSES_QOS, SENSOR_QOS
    from sim_bridge.expert_node import ExpertNode
    from sim_bridge.libero_env import load_suite

    node = ExpertNode(context=ros_context, parameter_overrides=[
        Parameter('use_image_stamp', value=True), Parameter('control_period', value=0.1)])
    peer = Node('fake_camera', context=ros_context)
    chunks = []
    peer.create_subscription(JointTrajectory, 'action_chunk', chunks.append, CHUNK_QOS)
    poses_pub = peer.create_publisher(String, 'sim/object_poses', POSES_QOS)
    image_pub = peer.create_publisher(Image, 'camera/image_raw', SENSOR_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(peer)
    try:
        deadline = time.monotonic() + 20.0
        while (poses_pub.get_subscription_count() == 0 or image_pub.get_subscription_count() == 0
               or peer.count_publishers('action_chunk') == 0) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        payload = json.loads(_state_json(scene(), (1, 0), episode=0, step=0))
        del payload['stamp']   # no stamp: the image's is used
        payload['language'] = load_suite('libero_spatial').get_task(0).language
        poses_pub.publish(String(data=json.dumps(payload)))
        image = Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(12))
        image.header.stamp.sec, image.header.stamp.nanosec = 42, 7
        while not chunks and time.monotonic() < deadline:
            if node._pending is not None:
                image_pub.publish(image)
            executor.spin_once(timeout_sec=0.05)
        assert chunks, 'no action_chunk answered the image'
        assert (chunks[0].header.stamp.sec, chunks[0].header.stamp.nanosec) == (42, 7)
        assert chunks[0].points[-1].time_from_start.nanosec == 800_000_000
        assert node.goal == GOAL    # from the state's language: no instruction was published
    finally:
        executor.shutdown()
        node.destroy_node()
        peer.destroy_node()


def test_expert_node_survives_hostile_privileged_states(expert_link):
    """What any peer can publish on sim/object_poses: each is refused (counted, a warning) and
    the node goes on answering good states (an exception in a callback would end its spin)."""
    from std_msgs.msg import String

    node, chunks, poses_pub = expert_link.node, expert_link.chunks, expert_link.poses_pub
    good = json.loads(_state_json(scene(), (20, 0), episode=0, step=0))
    hostile = [
        '[1, 2]',                                                   # not an object
        dict(good, stamp={'sec': 'x', 'nanosec': 0}),
        dict(good, stamp={'sec': 2 ** 40, 'nanosec': 0}),           # beyond int32
        dict(good, stamp={'sec': 1.5, 'nanosec': -1}),
        dict(good, objects=[1, 2]),
        dict(good, eef_pos={'x': 1}),
        dict(good, eef_quat=[[1, 0], [0]]),                        # ragged
        dict(good, objects={'plate_1': [float('nan')] * 7}),
        dict(good, step='eight'),
        dict(good, gripper_qpos=[0.0] * 100_000),                   # echoed cut, not whole
    ]
    for count, payload in enumerate(hostile, start=1):     # one at a time: depth 1
        poses_pub.publish(String(data=payload if isinstance(payload, str)
                                 else json.dumps(payload)))
        expert_link.spin_until(lambda count=count: node.refused_states >= count)
        assert node.refused_states == count, f'not refused: {str(payload)[:80]}'
    poses_pub.publish(String(data=json.dumps(good)))
    expert_link.spin_until(lambda: bool(chunks))
    assert [(c.header.stamp.sec, c.header.stamp.nanosec) for c in chunks] == [(20, 0)]
    assert node.chunks_published == 1
