"""rsd_policy against a hostile peer on its DDS domain, over real DDS (issue 16).

Each case sends what a broken or malicious peer could send and checks that it is refused with
a reason, counted exactly, kept out of the log beyond a bound, and that the node goes on to act
on the next good frame. Timings are printed for the record, never asserted.
"""

import os
import subprocess
import sys
import time

from builtin_interfaces.msg import Time
import numpy as np
from policy_harness import Camera
import rclpy
from sensor_msgs.msg import Image, JointState

from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.topics import SENSOR_QOS, stamp_ns


def test_an_oversized_instruction_is_refused_and_the_one_in_force_stays(run_policy):
    camera, policy = run_policy()
    camera.instruct()
    camera.chunk_for(camera.send())
    start = time.perf_counter()
    camera.instruct('pick up the bowl ' * 62_000)              # ~1 MB in one String
    camera.wait_counter('bad instructions', 1)
    print(f'1 MB instruction refused and counted {1e3 * (time.perf_counter() - start):.0f} ms '
          'after publishing')
    assert policy.node._mailbox.instruction(0) == \
        'pick up the black bowl and place it on the plate'
    camera.instruct('a ' * 1000)                               # < 2048 bytes, 1000 tokens
    camera.wait_counter('bad instructions', 2)
    chunk, _ = camera.chunk_for(camera.send())                 # still acting on the good one
    assert len(chunk.points) == 8


def test_stamps_from_the_future_or_before_1970_are_refused(run_policy):
    camera, _ = run_policy()
    camera.instruct()
    camera.send(age=-3600.0)                                   # one hour ahead
    camera.wait_counter('future', 1)
    msg = array_to_imgmsg(np.zeros((32, 32, 3), np.uint8))
    msg.header.stamp = Time(sec=-2_000_000_000, nanosec=0)     # what 2100 wraps to in int32
    camera.image_pub.publish(msg)
    camera.wait_counter('future', 2)
    assert not camera.chunks
    camera.chunk_for(camera.send())


def test_robot_state_beyond_a_physical_range_never_reaches_the_model(run_policy, proprio_bundle):
    from conftest import TEST_JOINTS

    camera, _ = run_policy(model_dir=str(proprio_bundle))
    joints = camera.create_publisher(JointState, 'joint_states', SENSOR_QOS)
    assert camera.spin_until(lambda: joints.get_subscription_count() > 0)
    camera.instruct()

    def publish(values):
        msg = JointState(name=list(TEST_JOINTS), position=[float(v) for v in values])
        msg.header.stamp = camera.get_clock().now().to_msg()
        joints.publish(msg)

    publish([1e30, 0.1, 0.02])
    time.sleep(0.2)
    camera.send()
    camera.wait_counter('bad state', 1)
    publish([0.3, -1.2, 0.04])
    time.sleep(0.2)
    camera.chunk_for(camera.send())


def test_a_thousand_distinct_malformed_images_add_little_to_the_log(tiny_bundle):
    namespace = f'/hostile_log_{os.getpid()}'
    process = subprocess.Popen(
        [sys.executable, '-m', 'rsd_ros.policy_main', '--ros-args', '-r', f'__ns:={namespace}',
         '-p', f'model_dir:={tiny_bundle}', '-p', "draft_dir:=''",
         '-p', 'diagnostics_period:=0.2'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = rclpy.Context()
    rclpy.init(context=context)
    camera = Camera(context, namespace, 'cpu')
    try:
        camera.connect()
        camera.instruct()
        for i in range(1000):
            bad = Image(height=4, width=4, encoding=f'bad{i}-' + 'x' * (200_000 if i < 20
                                                                       else 500),
                        step=12, data=bytes(48))
            camera.image_pub.publish(bad)
            camera.spinner.spin_once(timeout_sec=0.002)
        camera.wait_counter('bad images', 500)                 # best effort: most arrive
        stamp = camera.send()
        assert camera.spin_until(lambda: any(stamp_ns(c.header.stamp) == stamp
                                             for c in camera.chunks), 60.0)
        counted = int(camera.value('bad images'))
        process.terminate()
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        camera.close()
        context.try_shutdown()
    print(f'{counted} malformed images counted; the log grew by {len(output)} bytes')
    assert process.returncode == 0
    assert len(output.encode()) < 100_000, output[-2000:]
    assert output.count('image refused') <= 10            # a burst of distinct problems, no more
