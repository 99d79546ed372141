"""Test-session environment: a private ROS domain on loopback, headless rendering, one torch
thread per process, and the `ros_context`, `tiny_bundle` and `proprio_bundle` fixtures (built
by `bundles.make_test_bundle`)."""

import os
import random

# Before rclpy or MuJoCo are imported anywhere in this process or in processes it starts.
os.environ.setdefault('ROS_DOMAIN_ID', str(random.Random(os.getpid()).randint(1, 100)))
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
os.environ.setdefault('MUJOCO_GL', 'egl')
os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')
# The test process and the node processes it starts share 2 cores: one torch thread each
# avoids the oversubscription that makes a loaded torch 10x slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402


@pytest.fixture
def ros_context():
    """A fresh rclpy context for one test, shut down afterwards."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


@pytest.fixture(scope='session')
def tiny_bundle(tmp_path_factory):
    """Path of a complete tiny main bundle (no draft), built once per test session."""
    from bundles import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp('tiny_bundle') / 'bundle')


TEST_JOINTS = ('arm_joint1', 'arm_joint2', 'finger_joint')


@pytest.fixture(scope='session')
def proprio_bundle(tmp_path_factory):
    """A tiny main bundle whose model also takes the robot state: the positions of TEST_JOINTS
    (untrained proprioception input, unit statistics), built once per test session."""
    from bundles import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp('proprio_bundle') / 'bundle', seed=1,
                            proprio_names=TEST_JOINTS)


@pytest.fixture
def run_policy(ros_context, tiny_bundle):
    """rsd_policy over DDS: start(**parameters) -> (Camera, Policy), connected; both torn
    down after the test (test/policy_harness.py)."""
    from policy_harness import Camera, Policy, policy_namespace

    started = []

    def start(**parameters):
        namespace = policy_namespace()
        parameters = {'model_dir': str(tiny_bundle), 'draft_dir': '', 'max_image_age': 5.0,
                      'diagnostics_period': 0.1, 'hardware_id': namespace, **parameters}
        policy = Policy(namespace, **parameters)
        camera = Camera(ros_context, namespace, parameters['hardware_id'] or 'cpu')
        started.append((camera, policy))
        camera.connect(policy)
        return camera, policy

    yield start
    for camera, policy in started:
        camera.close()
        policy.close()


