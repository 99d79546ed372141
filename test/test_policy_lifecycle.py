"""rsd_policy as a managed node, and joint names that fit any arm, over real DDS.

The lifecycle is driven through the standard `change_state` / `get_state` services by a client
in another context, as `ros2 lifecycle set` calls them; the state mapping is exercised with a
Franka-named JointState against a model trained on other names.
"""

import itertools
import os
import time

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
from policy_harness import INSTRUCTION, Camera, Policy
import pytest
from rclpy.duration import Duration
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState

from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.policy_node import PolicyNode
from rsd_ros.topics import SENSOR_QOS, stamp_ns

FRANKA = ('panda_joint1', 'panda_joint2', 'panda_finger_joint1')
_namespaces = itertools.count()


def namespace() -> str:
    return f'/lifecycle_test_{os.getpid()}_{next(_namespaces)}'


class LifecycleClient:
    """change_state / get_state of one node, called from the test's own node."""

    def __init__(self, camera: Camera, node_path: str) -> None:
        self.camera = camera
        self.change = camera.create_client(ChangeState, f'{node_path}/change_state')
        self.get = camera.create_client(GetState, f'{node_path}/get_state')
        assert camera.spin_until(lambda: self.change.service_is_ready()
                                 and self.get.service_is_ready()), 'lifecycle services missing'

    def _call(self, client, request):
        future = client.call_async(request)
        assert self.camera.spin_until(future.done), 'lifecycle service did not answer'
        return future.result()

    def state(self) -> int:
        return self._call(self.get, GetState.Request()).current_state.id

    def transition(self, transition_id: int) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self._call(self.change, request).success


def no_chunk_for(camera: Camera, stamp: int, seconds: float = 3.0) -> bool:
    """True if no chunk stamped `stamp` arrives within `seconds` (time to infer many times)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        camera.spinner.spin_once(timeout_sec=0.05)
    return not any(stamp_ns(c.header.stamp) == stamp for c in camera.chunks)


@pytest.fixture
def managed(ros_context, tiny_bundle):
    started = []

    def start(**parameters):
        ns = namespace()
        parameters = {'model_dir': str(tiny_bundle), 'draft_dir': '', 'max_image_age': 5.0,
                      'diagnostics_period': 0.1, 'hardware_id': ns, 'autostart': False,
                      **parameters}
        policy = Policy(ns, **parameters)
        camera = Camera(ros_context, ns, ns)
        started.append((camera, policy))
        return camera, policy, LifecycleClient(camera, f'{ns}/rsd_policy')

    yield start
    for camera, policy in started:
        camera.close()
        policy.close()


def test_lifecycle_transitions_gate_the_chunks(managed):
    camera, policy, lifecycle = managed()
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert policy.node._engine is None                          # nothing loaded yet
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == State.PRIMARY_STATE_INACTIVE
    assert policy.node._engine is not None
    camera.connect(policy)
    camera.instruct()
    inactive_stamp = camera.send()
    assert no_chunk_for(camera, inactive_stamp)                 # configured, not active
    camera.wait_counter('inactive', 1)
    assert 'inactive' in camera.diagnostics[-1].message

    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    assert lifecycle.state() == State.PRIMARY_STATE_ACTIVE
    camera.chunk_for(camera.send())
    assert not any(stamp_ns(c.header.stamp) == inactive_stamp for c in camera.chunks)

    assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE)
    assert lifecycle.state() == State.PRIMARY_STATE_INACTIVE
    assert no_chunk_for(camera, camera.send())                  # stopped at once
    assert policy.node._engine is not None                      # the model is kept

    assert lifecycle.transition(Transition.TRANSITION_CLEANUP)
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert policy.node._engine is None
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    camera.connect(policy)
    camera.chunk_for(camera.send())                             # works again


def test_a_failed_configure_reports_and_stays_unconfigured(managed, tmp_path):
    camera, policy, lifecycle = managed(model_dir=str(tmp_path / 'nothing'))
    assert not lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert policy.node._engine is None


def test_franka_joint_names_are_mapped_onto_the_model(run_policy, proprio_bundle):
    camera, policy = run_policy(model_dir=str(proprio_bundle), state_joint_names=list(FRANKA))
    joints = camera.create_publisher(JointState, 'joint_states', SENSOR_QOS)
    assert camera.spin_until(lambda: joints.get_subscription_count() > 0)
    camera.instruct()
    msg = JointState(name=['panda_joint7', *FRANKA[::-1]], position=[5.0, 0.04, -1.2, 0.3])
    msg.header.stamp = camera.get_clock().now().to_msg()
    joints.publish(msg)
    assert camera.spin_until(lambda: policy.node._mailbox.joints(0) is not None)
    picture = camera.rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    expected, _ = policy.node._engine.predict(picture, INSTRUCTION,
                                              proprio=np.array([0.3, -1.2, 0.04], np.float32))
    chunk, record = camera.chunk_for(camera.send(array_to_imgmsg(picture)))
    assert record['no_state'] == 0
    np.testing.assert_allclose([p.positions for p in chunk.points], np.clip(expected, -1, 1),
                               atol=1e-6)
    stale = JointState(name=list(FRANKA[:2]), position=[0.1, 0.2])   # the finger missing
    stale.header.stamp = (camera.get_clock().now() - Duration(seconds=0.0)).to_msg()
    joints.publish(stale)
    assert camera.spin_until(lambda: list(policy.node._mailbox.joints(0).name) == list(FRANKA[:2]))
    camera.send()
    camera.wait_counter('no state', 1)


def test_a_mapping_of_the_wrong_length_is_refused_naming_what_the_model_needs(
        ros_context, proprio_bundle):
    with pytest.raises(ValueError, match=r"takes 3 state values, in this order: \['arm_joint1'"):
        PolicyNode(context=ros_context, parameter_overrides=[
            Parameter('model_dir', value=str(proprio_bundle)), Parameter('draft_dir', value=''),
            Parameter('state_joint_names', value=['panda_joint1'])])


def test_the_franka_config_maps_every_state_value_of_the_default_bundle():
    from launch_check import LaunchReader

    from rsd_core.bundle import default_bundle_dir
    from rsd_core.main_model import heads_proprio_names

    root = default_bundle_dir().parents[1]
    reader = LaunchReader({'rsd_ros': root})
    (node,) = reader.read(root / 'launch' / 'policy.launch.xml', {
        'robot_params_file': str(root / 'config' / 'franka.yaml'), 'autostart': 'false'})
    names = node.file_params()['state_joint_names']
    assert len(names) == len(heads_proprio_names(default_bundle_dir())) == 9
    assert names[0] == 'panda_joint1' and node.params['autostart'] is False
