"""Do camera frames reach a subscriber, and how late? `python -m rsd_ros.frame_delivery`.

Plays a camera on the sensor-data QoS of the topic contract (`topics.SENSOR_QOS`: best effort,
keep last 1): rgb8 sensor_msgs/Image frames of each size in turn (default 640x480, 1280x720,
1920x1080) at a fixed rate (default 30 Hz) for a fixed time (default 20 s per size), and
counts, per size, the fraction of frames a subscriber received and their latency (receive time
- header.stamp, p50/p90, ms). The subscriber keeps only the newest frame, as the policy does;
a frame counts as delivered when its callback ran.

The publisher runs as a subprocess (default: the realistic case, a camera driver and the policy
are two processes with two DDS participants) or in this process with its own node and thread
(`--same-process`, one participant: Fast DDS delivers intra-process without a transport).
Whatever the middleware environment says (`FASTDDS_BUILTIN_TRANSPORTS`,
`FASTDDS_DEFAULT_PROFILES_FILE`, ... as scripts/ros_env.sh sets them) applies to both sides, so
the same command measures a configuration before and after a change. A loss here is silent in
ROS: best effort drops a sample whose fragments do not all arrive, and says nothing.
"""

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image

from rsd_ros.topics import SENSOR_QOS, stamp_ns, time_msg

TOPIC = 'frame_delivery/image_raw'
DEFAULT_SIZES = ((640, 480), (1280, 720), (1920, 1080))
MATCH_TIMEOUT_S = 30.0
SETTLE_S = 1.0       # after matching, before the first frame: both sides have matched
DRAIN_S = 1.0        # after the last frame of a size, before the next (or the end)


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720)."""
    width, height = (int(part) for part in text.lower().split('x'))
    if width <= 0 or height <= 0:
        raise ValueError(f'not a frame size: {text!r}')
    return width, height


def percentile_ms(values_ns: list[int], q: float) -> float | None:
    return float(np.percentile(values_ns, q)) / 1e6 if values_ns else None


class FrameCamera(Node):
    """Publishes rgb8 frames of one size after another at a fixed rate."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('frame_delivery_camera', **node_kwargs)
        self.publisher = self.create_publisher(Image, TOPIC, SENSOR_QOS)

    def wait_for_subscriber(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        time.sleep(SETTLE_S)
        return True

    def play(self, width: int, height: int, rate: float, duration: float) -> int:
        """Publish frames of one size for `duration` s at `rate` Hz; the number sent."""
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        msg = Image(height=height, width=width, encoding='rgb8', step=width * 3)
        msg.header.frame_id = 'frame_delivery'
        msg.data = pixels.tobytes()         # built once; each frame only gets a new stamp
        period_ns = round(1e9 / rate)
        count = round(duration * rate)
        start = time.monotonic_ns()
        for i in range(count):
            delay = start + i * period_ns - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            msg.header.stamp = time_msg(self.get_clock().now().nanoseconds)
            self.publisher.publish(msg)
        return count


class FrameCounter(Node):
    """Records, per frame size, the stamps received and their latency."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('frame_delivery_counter', **node_kwargs)
        self.received: dict[tuple[int, int], dict[int, int]] = {}   # size -> stamp -> latency
        self.subscription = self.create_subscription(Image, TOPIC, self._on_image, SENSOR_QOS)

    def _on_image(self, msg: Image) -> None:
        now = self.get_clock().now().nanoseconds
        stamp = stamp_ns(msg.header.stamp)
        self.received.setdefault((msg.width, msg.height), {})[stamp] = now - stamp


def summarise(received: dict[tuple[int, int], dict[int, int]],
              sent: dict[tuple[int, int], int]) -> list[dict]:
    """Per size, frames received ({stamp ns: latency ns}) and sent -> one row: sent, delivered,
    fraction, latency p50/p90 (ms, None when nothing arrived)."""
    rows = []
    for (width, height), n in sent.items():
        latencies = list(received.get((width, height), {}).values())
        rows.append({'size': f'{width}x{height}', 'bytes': width * height * 3, 'sent': n,
                     'delivered': len(latencies),
                     'fraction': len(latencies) / n if n else 0.0,
                     'latency_p50_ms': percentile_ms(latencies, 50),
                     'latency_p90_ms': percentile_ms(latencies, 90)})
    return rows


def play_sizes(camera: FrameCamera, args: argparse.Namespace, report) -> None:
    """The camera side: wait for the counter, then each size in turn; `report(size, sent)`."""
    if not camera.wait_for_subscriber(MATCH_TIMEOUT_S):
        raise RuntimeError(f'no subscriber on {TOPIC} within {MATCH_TIMEOUT_S:.0f} s')
    for width, height in args.sizes:
        sent = camera.play(width, height, args.rate, args.duration)
        time.sleep(DRAIN_S)
        report((width, height), sent)


def run_publisher(args: argparse.Namespace) -> int:
    """`--role publisher`: the camera process; one JSON line per size on stdout."""
    def report(size: tuple[int, int], sent: int) -> None:
        print(json.dumps({'width': size[0], 'height': size[1], 'sent': sent}), flush=True)

    try:
        with rclpy.init():
            camera = FrameCamera()
            play_sizes(camera, args, report)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 1
    return 0


def publisher_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, '-m', 'rsd_ros.frame_delivery', '--role', 'publisher',
            '--sizes', ','.join(f'{w}x{h}' for w, h in args.sizes),
            '--rate', str(args.rate), '--duration', str(args.duration)]


def measure(args: argparse.Namespace) -> list[dict]:
    """The counter in this process, the camera in a subprocess or a thread; the summary."""
    sent: dict[tuple[int, int], int] = {}
    with rclpy.init():
        counter = FrameCounter()
        executor = SingleThreadedExecutor()
        executor.add_node(counter)
        if args.same_process:
            camera = FrameCamera()
            errors: list[BaseException] = []

            def play() -> None:
                try:
                    play_sizes(camera, args, sent.__setitem__)
                except BaseException as error:       # reported by the measuring thread
                    errors.append(error)

            thread = threading.Thread(target=play, daemon=True)
            thread.start()
            while thread.is_alive():
                executor.spin_once(timeout_sec=0.05)
            if errors:
                raise errors[0]
        else:
            process = subprocess.Popen(publisher_command(args), stdout=subprocess.PIPE,
                                       text=True)
            while process.poll() is None:
                executor.spin_once(timeout_sec=0.05)
            for line in process.stdout.read().splitlines():
                row = json.loads(line)
                sent[row['width'], row['height']] = row['sent']
            if process.returncode != 0:
                raise RuntimeError(f'the camera process exited with {process.returncode}')
        executor.shutdown()
        return summarise(counter.received, sent)


def print_table(rows: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return '-' if value is None else f'{value:.1f}'

    print('| size | MB | delivered | fraction | latency p50 ms | latency p90 ms |')
    print('| --- | ---: | ---: | ---: | ---: | ---: |')
    for row in rows:
        print(f"| {row['size']} | {row['bytes'] / 1e6:.1f} | {row['delivered']}/{row['sent']} "
              f"| {row['fraction']:.0%} | {ms(row['latency_p50_ms'])} "
              f"| {ms(row['latency_p90_ms'])} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--sizes', default=','.join(f'{w}x{h}' for w, h in DEFAULT_SIZES),
                        type=lambda text: [parse_size(s) for s in text.split(',')],
                        help='comma-separated WIDTHxHEIGHT frame sizes, measured in turn')
    parser.add_argument('--rate', type=float, default=30.0, help='frames per second')
    parser.add_argument('--duration', type=float, default=20.0, help='seconds per size')
    parser.add_argument('--same-process', action='store_true',
                        help='publish from a thread of this process instead of a subprocess')
    parser.add_argument('--json', action='store_true', help='print the rows as one JSON list')
    parser.add_argument('--role', choices=('measure', 'publisher'), default='measure',
                        help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m rsd_ros.frame_delivery',
                                     description=__doc__.split('\n')[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.role == 'publisher':
        return run_publisher(args)
    try:
        rows = measure(args)
    except KeyboardInterrupt:
        return 1
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
