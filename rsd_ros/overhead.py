"""How much latency the ROS layer adds on top of the engine: `python -m rsd_ros.overhead`.

Plays a camera: publishes N 224x224 rgb8 frames on `camera/image_raw` (instruction once on
`instruction`; before each frame a JointState on `joint_states` with the same stamp when the
model takes proprioception) to a policy node and records, for each frame, the camera-to-action
latency (receive time of its `action_chunk` - header.stamp) and the engine's own `total_ms` for the
same frame (the `policy_stats` line with the same stamp). Frames go one at a time, each after
the previous chunk arrived, so the difference is transport + conversion + node overhead, not
queueing behind an earlier inference. Prints p50/p90 of latency, engine time and overhead.

The policy runs as a subprocess (`--policy subprocess`, default: the realistic case, its own
interpreter and DDS participant), in this process with its own context and executor thread
(`--policy in-process`, shares the GIL with this tool), or is one already running in the same
ROS domain and namespace (`--policy external`).
"""

import argparse
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_core.bundle import default_bundle_dir
from rsd_core.main_model import heads_proprio_names
from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.messages import stamp_ns
from rsd_ros.policy_node import CHUNK_QOS, INSTRUCTION_QOS, STATS_QOS, PolicyNode

INSTRUCTION = 'pick up the black bowl and place it on the plate'


class Camera(Node):
    """Publishes frames and the instruction; collects chunk receive times and policy_stats."""

    def __init__(self, joint_names: tuple[str, ...] = (), **node_kwargs) -> None:
        super().__init__('rsd_overhead_camera', **node_kwargs)
        self.joint_names = joint_names
        self.image_pub = self.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
        self.joint_pub = self.create_publisher(JointState, 'joint_states',
                                               qos_profile_sensor_data)
        self.instruction_pub = self.create_publisher(String, 'instruction', INSTRUCTION_QOS)
        self.chunk_received: dict[int, int] = {}          # stamp ns -> receive time ns
        self.stats: dict[int, dict] = {}                  # stamp ns -> policy_stats record
        self.subscriptions_in = [
            self.create_subscription(JointTrajectory, 'action_chunk', self._on_chunk, CHUNK_QOS),
            self.create_subscription(String, 'policy_stats', self._on_stats, STATS_QOS)]

    def _on_chunk(self, msg: JointTrajectory) -> None:
        self.chunk_received[stamp_ns(msg.header.stamp)] = self.get_clock().now().nanoseconds

    def _on_stats(self, msg: String) -> None:
        record = json.loads(msg.data)
        self.stats[record['stamp']['sec'] * 1_000_000_000 + record['stamp']['nanosec']] = record

    def policy_connected(self) -> bool:
        """Every endpoint matched with the policy's (a sample sent earlier may be lost)."""
        return (self.image_pub.get_subscription_count() > 0
                and self.instruction_pub.get_subscription_count() > 0
                and (not self.joint_names or self.joint_pub.get_subscription_count() > 0)
                and all(s.get_publisher_count() > 0 for s in self.subscriptions_in))


def spin_until(executor: SingleThreadedExecutor, done, timeout: float) -> bool:
    """Spin until `done()` is true; False if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        executor.spin_once(timeout_sec=0.01)
    return True


def policy_parameters(args: argparse.Namespace) -> dict:
    """ROS parameters of the measured policy node (image age check off)."""
    return {'model_dir': args.model_dir, 'draft_dir': args.draft_dir, 'dtype': args.dtype,
            'max_image_age': 0.0}


def start_subprocess(args: argparse.Namespace) -> subprocess.Popen:
    """The policy node as `python -m rsd_ros.policy_main` in the namespace."""
    command = [sys.executable, '-m', 'rsd_ros.policy_main', '--ros-args',
               '-r', f'__ns:={args.namespace}']
    for name, value in policy_parameters(args).items():
        command += ['-p', f'{name}:={value}' if value != '' else f"{name}:=''"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sys.stderr)


def start_in_process(args: argparse.Namespace):
    """PolicyNode in its own context, spun on a thread. Returns a stop() function."""
    from rclpy.parameter import Parameter

    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyNode(context=context, namespace=args.namespace, parameter_overrides=[
        Parameter(name, value=value) for name, value in policy_parameters(args).items()])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()

    def stop() -> None:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
        thread.join(timeout=5.0)
    return stop


def frame(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random [size, size, 3] uint8 RGB image."""
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)   # [size, size, 3] RGB


def measure(camera: Camera, executor: SingleThreadedExecutor, args: argparse.Namespace,
            ) -> list[tuple[float, float, dict]]:
    """(latency ms, engine total ms, stats record) per measured frame."""
    rng = np.random.default_rng(0)
    camera.instruction_pub.publish(String(data=INSTRUCTION))
    rows, missed = [], 0
    for i in range(args.warmup + args.frames):
        msg = array_to_imgmsg(frame(rng, args.size))
        stamp = camera.get_clock().now()                # the camera's capture time
        msg.header.stamp = stamp.to_msg()
        if camera.joint_names:
            joints = JointState(name=list(camera.joint_names),
                                position=rng.normal(0.0, 0.5, len(camera.joint_names)).tolist())
            joints.header.stamp = msg.header.stamp
            camera.joint_pub.publish(joints)
        camera.image_pub.publish(msg)
        key = stamp.nanoseconds
        # A warm-up frame or chunk may be lost while discovery completes: move on quickly.
        timeout = min(args.timeout, 10.0) if i < args.warmup else args.timeout
        if not spin_until(executor, lambda k=key: k in camera.chunk_received and
                          k in camera.stats, timeout):
            if i < args.warmup:
                continue
            print(f'frame {i}: no chunk within {timeout} s (frame lost or policy stuck)',
                  file=sys.stderr)
            missed += 1
            if missed == 3:
                break
            continue
        missed = 0
        if i >= args.warmup:
            latency = (camera.chunk_received[key] - key) * 1e-6
            rows.append((latency, camera.stats[key]['total_ms'], camera.stats[key]))
    return rows


def report(rows: list[tuple[float, float, dict]]) -> None:
    """Print p50/p90 (ms) of latency, engine time and each part of the ROS overhead."""
    latency = np.asarray([r[0] for r in rows])
    total = np.asarray([r[1] for r in rows])
    node = {key: np.asarray([r[2][key] for r in rows])
            for key in ('receive_ms', 'wait_ms', 'convert_ms', 'predict_ms', 'latency_ms')}
    print(f'{len(rows)} frames, one at a time; ms        p50       p90')
    for label, values in (
            ('camera-to-action latency (received)', latency),
            ('engine total_ms', total),
            ('ROS overhead (latency - total_ms)', latency - total),
            ('  stamp -> image callback in the node', node['receive_ms']),
            ('  image callback -> inference start', node['wait_ms']),
            ('  cv_bridge conversion', node['convert_ms']),
            ('  engine call outside its total_ms', node['predict_ms'] - total),
            ('  engine return -> chunk publish', node['latency_ms'] - node['receive_ms']
             - node['wait_ms'] - node['convert_ms'] - node['predict_ms']),
            ('  chunk publish -> received here', latency - node['latency_ms'])):
        p50, p90 = np.percentile(values, [50, 90])
        print(f'{label:<40} {p50:9.2f} {p90:9.2f}')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The overhead tool's options."""
    parser.add_argument('--frames', type=int, default=50, help='measured frames')
    parser.add_argument('--warmup', type=int, default=3, help='frames not measured')
    parser.add_argument('--size', type=int, default=224, help='image side, px')
    parser.add_argument('--policy', choices=('subprocess', 'in-process', 'external'),
                        default='subprocess')
    parser.add_argument('--model-dir', default='', help="bundle ('' = the default bundle)")
    parser.add_argument('--test-bundle', action='store_true',
                        help='build the tiny test bundle in a temporary directory and use it')
    parser.add_argument('--draft-dir', default='default')
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--namespace', default='/rsd_overhead')
    parser.add_argument('--timeout', type=float, default=60.0,
                        help='s to wait for the policy to appear, and for one chunk')


def run(args: argparse.Namespace) -> int:
    """Measure and print the overhead (test bundle built first if asked); 1 if no policy
    answered."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.test_bundle:
            from rsd_core.training.build_default import build_untrained_bundle

            args.model_dir = str(build_untrained_bundle(Path(tmp) / 'bundle'))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    process, stop = None, None
    if args.policy == 'subprocess':
        process = start_subprocess(args)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        if args.policy == 'in-process':
            stop = start_in_process(args)
        names = heads_proprio_names(args.model_dir or default_bundle_dir())
        camera = Camera(names, context=context, namespace=args.namespace)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(camera)
        exited = (lambda: process.poll() is not None) if process else (lambda: False)
        spin_until(executor, lambda: camera.policy_connected() or exited(), args.timeout)
        if not camera.policy_connected():
            print(f'no policy found on {camera.image_pub.topic_name} within {args.timeout} s'
                  + (' (the policy process exited)' if exited() else ''), file=sys.stderr)
            return 1
        rows = measure(camera, executor, args)
        if not rows:
            return 1
        report(rows)
        return 0
    finally:
        if stop is not None:
            stop()
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        context.try_shutdown()


def main() -> int:
    """Entry point of `python -m rsd_ros.overhead` (discovery kept to localhost)."""
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    parser = argparse.ArgumentParser(prog='python -m rsd_ros.overhead',
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == '__main__':
    sys.exit(main())
