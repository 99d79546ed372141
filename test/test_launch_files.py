"""The XML launch files name only things that exist, and the graph they start connects.

`ros2 launch` is not installable here, so launch_check reads the files as launch_ros does and the
tests start exactly the executables, parameters and remaps they name as real processes.
"""

from importlib.metadata import entry_points
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from launch_check import LaunchError, LaunchReader, NodeSpec
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / 'launch').glob('*.launch.xml'))
READER = LaunchReader({'rsd_ros': ROOT})


def console_scripts() -> dict[str, object]:
    """The package's console scripts, loaded: each names a real function."""
    return {ep.name: ep.load() for ep in entry_points(group='console_scripts')
            if ep.value.split('.')[0] in {'rsd_core', 'rsd_ros', 'sim_bridge'}}


def test_there_are_launch_files():
    assert {p.name for p in LAUNCH_FILES} >= {'policy.launch.xml', 'libero_sim.launch.xml'}


@pytest.mark.parametrize('launch_file', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_names_existing_things(launch_file):
    nodes = READER.read(launch_file)
    assert nodes, 'the launch file starts no node'
    scripts = console_scripts()
    for node in nodes:
        assert node.pkg == 'rsd_ros', node.source
        assert node.executable in scripts, f'{node.source}: no executable {node.executable!r}'
        for path in node.param_files:
            assert node.file_params(), f'{path} gives node {node.name!r} no parameters'


def test_checker_refuses_unknown_things(tmp_path):
    bad = tmp_path / 'bad.launch.xml'
    bad.write_text('<launch><node pkg="rsd_ros" exec="rsd_policy" name="p">'
                   '<param name="x" value="$(var missing)"/></node></launch>')
    with pytest.raises(LaunchError, match=r'\$\(var missing\)'):
        READER.read(bad)
    bad.write_text('<launch><group><node pkg="rsd_ros" exec="x" name="p"/></group></launch>')
    with pytest.raises(LaunchError, match='not understood'):
        READER.read(bad)
    with pytest.raises(LaunchError, match='non-empty list'):     # as launch_ros refuses it
        READER.read(ROOT / 'launch' / 'policy_arms.launch.xml', {'arms': '[]'})


class Graph:
    """Starts NodeSpecs as processes and inspects them from a probe node."""

    def __init__(self, context, nodes: list[NodeSpec], log_dir: Path) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        self.nodes = nodes
        self.processes = []
        for spec in nodes:
            exe = Path(sys.executable).parent / spec.executable
            log = open(log_dir / f'{spec.name}.log', 'w')
            self.processes.append(subprocess.Popen([str(exe), *spec.ros_args()], stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=log_dir))
        self.probe = Node('launch_probe', context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.probe)
        self.log_dir = log_dir

    def logs(self) -> str:
        return '\n'.join(f'--- {p.name}\n{p.read_text()[-3000:]}'
                         for p in sorted(self.log_dir.glob('*.log')))

    def spin_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.1)
            if condition():
                return
            for process in self.processes:
                assert process.poll() is None, f'a node exited while waiting for {what}\n' + \
                    self.logs()
        raise AssertionError(f'timed out waiting for {what}\n{self.logs()}')

    def declared_parameters(self, spec: NodeSpec) -> set[str]:
        from rcl_interfaces.srv import ListParameters

        prefix = f'/{spec.namespace.strip("/")}' if spec.namespace else ''
        client = self.probe.create_client(ListParameters, f'{prefix}/{spec.name}/list_parameters')
        assert client.wait_for_service(timeout_sec=30.0), f'{spec.name}: no parameter service'
        future = client.call_async(ListParameters.Request())
        self.executor.spin_until_future_complete(future, timeout_sec=10.0)
        return set(future.result().result.names)

    def close(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.executor.shutdown()
        self.probe.destroy_node()


def check_parameters(graph: Graph) -> None:
    for spec in graph.nodes:
        named = set(spec.params) | set(spec.file_params())
        missing = named - graph.declared_parameters(spec)
        assert not missing, f'{spec.name} does not declare {sorted(missing)}'


def test_policy_launch_starts_a_working_policy(ros_context, tiny_bundle, tmp_path):
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    nodes = READER.read(ROOT / 'launch' / 'policy.launch.xml',
                        {'model_dir': str(tiny_bundle), 'draft_dir': '', 'namespace': 'arm'})
    graph = Graph(ros_context, nodes, tmp_path)
    try:
        chunks = []
        probe = graph.probe
        latched = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        probe.create_subscription(JointTrajectory, '/arm/action_chunk', chunks.append, 10)
        images = probe.create_publisher(Image, '/arm/camera/image_raw', qos_profile_sensor_data)
        instruction = probe.create_publisher(String, '/arm/instruction', latched)
        instruction.publish(String(data='pick up the black bowl and place it on the plate'))
        graph.spin_until(lambda: probe.count_subscribers('/arm/camera/image_raw') > 0, 60.0,
                         'the policy to subscribe to the camera')
        check_parameters(graph)

        def publish_frame() -> bool:
            frame = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
            msg = Image(height=96, width=96, encoding='rgb8', step=96 * 3)
            msg.header.stamp = probe.get_clock().now().to_msg()
            msg.data = frame.tobytes()
            images.publish(msg)
            return bool(chunks)

        graph.spin_until(publish_frame, 60.0, 'an action chunk')
        assert len(chunks[0].points) == 8 and len(chunks[0].points[0].positions) == 7
    finally:
        graph.close()


def test_policy_arms_launch_serves_each_arm_on_its_own_topics(ros_context, tiny_bundle,
                                                             tmp_path):
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    nodes = READER.read(ROOT / 'launch' / 'policy_arms.launch.xml',
                        {'model_dir': str(tiny_bundle), 'draft_dir': '', 'namespace': 'cell',
                         'arms': '[left, right]'})
    (node,) = nodes
    assert node.params['arms'] == ['left', 'right'] and node.params['batch_window'] == 0.015
    graph = Graph(ros_context, nodes, tmp_path)
    try:
        probe = graph.probe
        latched = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        chunks = {arm: [] for arm in ('left', 'right')}
        images = {}
        for arm, received in chunks.items():
            probe.create_subscription(JointTrajectory, f'/cell/{arm}/action_chunk',
                                      received.append, 10)
            images[arm] = probe.create_publisher(Image, f'/cell/{arm}/camera/image_raw',
                                                 qos_profile_sensor_data)
            instruction = probe.create_publisher(String, f'/cell/{arm}/instruction', latched)
            instruction.publish(String(data=f'{arm}: pick up the black bowl'))
        graph.spin_until(lambda: all(probe.count_subscribers(f'/cell/{arm}/camera/image_raw')
                                     for arm in chunks), 60.0,
                         'the policy to subscribe to both cameras')
        check_parameters(graph)
        stamps = {arm: set() for arm in chunks}

        def publish_frames() -> bool:
            for arm, publisher in images.items():
                msg = Image(height=96, width=96, encoding='rgb8', step=96 * 3,
                            data=bytes(96 * 96 * 3))
                msg.header.stamp = probe.get_clock().now().to_msg()
                stamps[arm].add((msg.header.stamp.sec, msg.header.stamp.nanosec))
                publisher.publish(msg)
            return all(chunks.values())

        graph.spin_until(publish_frames, 60.0, 'an action chunk for each arm')
        for arm, received in chunks.items():      # each arm's chunk answers its own frame
            stamp = received[0].header.stamp
            assert (stamp.sec, stamp.nanosec) in stamps[arm]
    finally:
        graph.close()


@pytest.mark.skipif(os.environ.get('MUJOCO_GL') != 'egl', reason='needs headless MuJoCo')
def test_libero_sim_launch_connects_bridge_and_policy(ros_context, tiny_bundle, tmp_path):
    from trajectory_msgs.msg import JointTrajectory

    nodes = READER.read(ROOT / 'launch' / 'libero_sim.launch.xml',
                        {'model_dir': str(tiny_bundle), 'draft_dir': '', 'episodes': '1',
                         'results_file': str(tmp_path / 'results.jsonl')})
    assert {n.executable for n in nodes} == {'rsd_policy', 'libero_bridge'}
    graph = Graph(ros_context, nodes, tmp_path)
    try:
        chunks = []
        graph.probe.create_subscription(JointTrajectory, 'action_chunk', chunks.append, 10)
        graph.spin_until(lambda: len(chunks) >= 2, 180.0, 'chunks flowing policy -> bridge')
        check_parameters(graph)
        for topic, publisher, subscriber in [('/camera/image_raw', 'libero_bridge', 'rsd_policy'),
                                             ('/instruction', 'libero_bridge', 'rsd_policy'),
                                             ('/action_chunk', 'rsd_policy', 'libero_bridge')]:
            pubs = {i.node_name for i in graph.probe.get_publishers_info_by_topic(topic)}
            subs = {i.node_name for i in graph.probe.get_subscriptions_info_by_topic(topic)}
            assert publisher in pubs and subscriber in subs, (topic, pubs, subs)
    finally:
        graph.close()
