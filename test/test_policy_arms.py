"""One rsd_policy serving several arms over real DDS, with the real engine on the tiny bundles.

The policy runs in its own context with `arms`; each arm is played by its own test camera on
`<arm>/...`. The engine runs in float64 here so that a row of a batch and the same input alone
give the same codes (no float32 near tie can flip one), and each arm's chunk is compared with
`engine.predict` of that arm's own image and instruction.
"""

import numpy as np
from policy_harness import Camera, Policy, policy_namespace
import pytest
from sensor_msgs.msg import Image, JointState

from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.topics import SENSOR_QOS, stamp_ns

INSTRUCTIONS = ('pick up the black bowl and place it on the plate', 'turn on the stove',
                'open the middle drawer of the cabinet')


@pytest.fixture
def run_arms(ros_context, tiny_bundle):
    """start(arms, **parameters) -> (one connected Camera per arm, Policy); torn down after
    the test."""
    started = []

    def start(arms: list[str], **parameters):
        namespace = policy_namespace()
        parameters = {'model_dir': str(tiny_bundle), 'draft_dir': '', 'dtype': 'float64',
                      'max_image_age': 5.0, 'diagnostics_period': 0.1, 'hardware_id': namespace,
                      'arms': arms, **parameters}
        policy = Policy(namespace, **parameters)
        cameras = [Camera(ros_context, namespace, namespace, arm) for arm in arms]
        started.append((cameras, policy))
        for camera in cameras:
            camera.connect(policy)
        return cameras, policy

    yield start
    for cameras, policy in started:
        for camera in cameras:
            camera.close()
        policy.close()


def instruct(cameras: list[Camera], policy: Policy, texts=INSTRUCTIONS) -> None:
    """Give each camera's arm its own instruction and wait until it is in force."""
    for index, (camera, text) in enumerate(zip(cameras, texts, strict=False)):
        camera.instruct(text)
        assert camera.spin_until(lambda i=index, t=text: policy.node._mailbox.instruction(i) == t)


def picture(camera: Camera) -> np.ndarray:
    return camera.rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)


def positions(chunk) -> np.ndarray:
    return np.array([p.positions for p in chunk.points])


def test_each_arm_gets_its_own_chunk_from_one_batch(run_arms):
    cameras, policy = run_arms(['arm0', 'arm1', 'left/arm2'], batch_window=1.0)
    instruct(cameras, policy)
    pictures = [picture(camera) for camera in cameras]
    stamps = [camera.send(array_to_imgmsg(image)) for camera, image in zip(cameras, pictures,
                                                                           strict=True)]
    engine = policy.node._engine
    for camera, image, text, stamp in zip(cameras, pictures, INSTRUCTIONS, stamps, strict=True):
        chunk, record = camera.chunk_for(stamp)            # stamped with its own image's stamp
        assert record['batch'] == 3, 'frames sent together were not decoded together'
        assert record['chunks'] == 1 and record['frames'] == 1
        expected, _ = engine.predict(image, text)
        np.testing.assert_allclose(positions(chunk), np.clip(expected, -1, 1), atol=1e-6)
        assert [stamp_ns(c.header.stamp) for c in camera.chunks] == [stamp]  # nobody else's
    arms = [np.clip(engine.predict(image, text)[0], -1, 1)
            for image, text in zip(pictures, INSTRUCTIONS, strict=True)]
    assert not np.allclose(arms[0], arms[1])               # the arms really differ
    for camera in cameras:
        camera.wait_counter('chunks', 1)
        status = camera.diagnostics[-1]
        assert status.name == f'rsd_policy: {camera.arm} inference'
        assert camera.value('batch size mean') == '3.00' and camera.value('frames') == '1'


def test_a_silent_arm_costs_the_others_at_most_the_window(run_arms):
    window = 1.0
    cameras, policy = run_arms(['arm0', 'arm1'], batch_window=window)
    active, silent = cameras
    instruct([active], policy)                     # an arm without instruction: not waited for
    _, record = active.chunk_for(active.send())
    assert record['batch'] == 1 and record['wait_ms'] < window * 1e3
    silent.instruct(INSTRUCTIONS[1])               # instructed, but its camera stays silent
    assert silent.spin_until(lambda: policy.node._mailbox.instruction(1) == INSTRUCTIONS[1])
    for _ in range(2):
        _, record = active.chunk_for(active.send())
        assert record['batch'] == 1
        # waited for the silent arm, but not longer than the window (+ a loaded machine)
        assert window * 1e3 * 0.95 <= record['wait_ms'] < window * 1e3 + 3000
    stamps = [camera.send() for camera in cameras]  # the silent arm speaks: one batch again
    for camera, stamp in zip(cameras, stamps, strict=True):
        _, record = camera.chunk_for(stamp)
        assert record['batch'] == 2
    assert silent.stats[-1]['chunks'] == 1 and active.stats[-1]['chunks'] == 4


def test_an_arms_bad_input_does_not_touch_another_arm(run_arms):
    cameras, policy = run_arms(['arm0', 'arm1'], batch_window=1.0, max_image_age=2.0)
    good, bad = cameras
    instruct(cameras, policy)
    bad.send(Image(height=4, width=4, encoding='yuv422', step=8, data=bytes(32)))
    bad.wait_counter('bad images', 1)
    bad.instruct('')                                       # refused; its own one stays
    bad.wait_counter('bad instructions', 1)
    assert policy.node._mailbox.instruction(1) == INSTRUCTIONS[1]
    stale = bad.send(age=10.0)
    fresh = good.send()
    _, record = good.chunk_for(fresh)
    bad.wait_counter('stale', 1)
    assert (record['bad_images'], record['bad_instructions'], record['stale']) == (0, 0, 0)
    assert record['frames'] == 1 and record['chunks'] == 1
    image = picture(bad)
    _, record = bad.chunk_for(bad.send(array_to_imgmsg(image)))
    assert (record['bad_images'], record['bad_instructions'], record['stale']) == (1, 1, 1)
    assert record['frames'] == 3 and record['chunks'] == 1
    assert all(stamp_ns(c.header.stamp) != stale for c in bad.chunks + good.chunks)
    good.wait_counter('chunks', 1)
    assert good.value('bad images') == good.value('stale') == '0'


def test_each_arm_acts_on_its_own_robot_state(run_arms, proprio_bundle):
    from conftest import TEST_JOINTS

    cameras, policy = run_arms(['arm0', 'arm1'], model_dir=str(proprio_bundle),
                               batch_window=1.0)
    publishers = [camera.create_publisher(JointState, camera.topic('joint_states'), SENSOR_QOS)
                  for camera in cameras]
    for camera, publisher in zip(cameras, publishers, strict=True):
        assert camera.spin_until(lambda p=publisher: p.get_subscription_count() > 0)
    instruct(cameras, policy)
    cameras[1].send()                                      # no joint state yet: this arm only
    cameras[1].wait_counter('no state', 1)
    states = [np.array([0.3, -1.2, 0.04], np.float32), np.array([-0.5, 0.7, 0.01], np.float32)]
    for index, (camera, publisher, state) in enumerate(zip(cameras, publishers, states,
                                                           strict=True)):
        msg = JointState(name=list(TEST_JOINTS), position=[float(v) for v in state])
        msg.header.stamp = camera.get_clock().now().to_msg()
        publisher.publish(msg)
        assert camera.spin_until(lambda i=index: policy.node._mailbox.joints(i) is not None)
    pictures = [picture(camera) for camera in cameras]
    stamps = [camera.send(array_to_imgmsg(image)) for camera, image in zip(cameras, pictures,
                                                                           strict=True)]
    engine = policy.node._engine
    for camera, image, text, state, stamp in zip(cameras, pictures, INSTRUCTIONS, states, stamps,
                                                 strict=False):
        chunk, record = camera.chunk_for(stamp)
        assert record['batch'] == 2
        expected, _ = engine.predict(image, text, proprio=state)
        np.testing.assert_allclose(positions(chunk), np.clip(expected, -1, 1), atol=1e-6)
    assert cameras[0].stats[-1]['no_state'] == 0 and cameras[1].stats[-1]['no_state'] == 1
