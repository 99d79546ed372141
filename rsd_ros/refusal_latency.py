"""How soon rsd_policy refuses an over-long instruction: `python -m rsd_ros.refusal_latency`.

Starts `rsd_policy` as its own process (two DDS participants, as in use), puts a valid
instruction in force, then publishes over-long std_msgs/String instructions (default 1 MB) one
at a time and waits for each refusal to become observable: the node's warning on /rosout
('instruction of N bytes refused'). Per run it reports, from just before `publish` (ms):
`refused_ms` (the log record's stamp: the node's own clock when it refused, which includes the
transfer and deserialisation of the sample) and `observed_ms` (when that record arrived here).
The counter `bad instructions` only leaves the node in /diagnostics, once per
diagnostics_period, so it would measure the period; the log line is sent at once.

Each run's text has a different length, so each refusal is a distinct problem that the node
logs (rsd_ros.log_limiter: once each, at most 10 a minute; hence at most 10 runs). Whatever
the middleware environment says (FASTDDS_DEFAULT_PROFILES_FILE: scripts/ros_env.sh's 16 MiB
shared-memory profile, or the default 512 KiB segment) applies to both processes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from rcl_interfaces.msg import Log
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_rosout_default
from std_msgs.msg import String

from rsd_ros.topics import INSTRUCTION_QOS, stamp_ns

INSTRUCTION = 'pick up the black bowl and place it on the plate'
START_TIMEOUT_S = 120.0    # the policy process loading its model on a busy machine
REFUSAL_TIMEOUT_S = 30.0
MAX_RUNS = 10              # distinct problems the node logs per minute (log_limiter burst)


class Operator(Node):
    """Publishes instructions and records the policy's /rosout lines with their arrival time."""

    def __init__(self, namespace: str) -> None:
        super().__init__('refusal_operator', namespace=namespace)
        self.policy_logger = f'{namespace.strip("/").replace("/", ".")}.rsd_policy'
        self.publisher = self.create_publisher(String, 'instruction', INSTRUCTION_QOS)
        self.logs: list[tuple[int, Log]] = []      # (arrival, ns since the epoch; the record)
        self.create_subscription(Log, '/rosout', self._on_log, qos_profile_rosout_default)
        self.spinner = SingleThreadedExecutor()
        self.spinner.add_node(self)

    def _on_log(self, msg: Log) -> None:
        if msg.name == self.policy_logger:
            self.logs.append((time.time_ns(), msg))

    def wait_for_log(self, start: str, timeout: float) -> tuple[int, Log]:
        """The first policy log line beginning with `start`: (arrival ns, record)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [(t, m) for t, m in self.logs if m.msg.startswith(start)]
            if found:
                return found[0]
            self.spinner.spin_once(timeout_sec=0.01)
        raise RuntimeError(f'no policy log line starting {start!r} within {timeout:.0f} s')

    def wait_for_subscriber(self, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.publisher.get_subscription_count() == 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('rsd_policy did not subscribe to the instruction topic '
                                   f'(exit status {process.poll()})')
            self.spinner.spin_once(timeout_sec=0.05)


def over_long(size: int) -> str:
    """An ASCII instruction of exactly `size` bytes."""
    words = 'pick up the bowl '
    return (words * (size // len(words) + 1))[:size]


def measure(operator: Operator, runs: int, size: int) -> list[dict]:
    """`runs` refusals of instructions of size, size + 1, ... bytes, one at a time."""
    rows = []
    for run in range(runs):
        text = over_long(size + run)
        published = time.time_ns()
        operator.publisher.publish(String(data=text))
        arrived, record = operator.wait_for_log(f'instruction of {len(text)} bytes refused',
                                                REFUSAL_TIMEOUT_S)
        rows.append({'bytes': len(text), 'refused_ms': (stamp_ns(record.stamp) - published) / 1e6,
                     'observed_ms': (arrived - published) / 1e6})
    return rows


def policy_command(namespace: str, model_dir: str) -> list[str]:
    """rsd_policy in `namespace`, main-only, on `model_dir` ('' = the default bundle)."""
    model = ['-p', f'model_dir:={model_dir}'] if model_dir else []
    return [sys.executable, '-m', 'rsd_ros.policy_main', '--ros-args', '-r', f'__ns:={namespace}',
            *model, '-p', "draft_dir:=''"]


def run(runs: int, size: int, model_dir: str) -> list[dict]:
    """Start the policy process, make sure it acts on a valid instruction, measure, stop it."""
    namespace = f'/refusal_latency_{os.getpid()}'
    process = subprocess.Popen(policy_command(namespace, model_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        with rclpy.init():
            operator = Operator(namespace)
            operator.wait_for_subscriber(process, START_TIMEOUT_S)
            operator.publisher.publish(String(data=INSTRUCTION))
            operator.wait_for_log('instruction:', START_TIMEOUT_S)
            rows = measure(operator, runs, size)
            operator.spinner.shutdown()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def summary(rows: list[dict]) -> dict:
    """Median, min and max of refused_ms and observed_ms."""
    return {key: {'median': statistics.median(r[key] for r in rows),
                  'min': min(r[key] for r in rows), 'max': max(r[key] for r in rows)}
            for key in ('refused_ms', 'observed_ms')}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--runs', type=int, default=9, choices=range(1, MAX_RUNS + 1),
                        metavar=f'1..{MAX_RUNS}', help='refusals measured (default 9)')
    parser.add_argument('--bytes', type=int, default=1_000_000,
                        help='size of the first over-long instruction (default 1 MB)')
    parser.add_argument('--model-dir', default='', help="bundle for rsd_policy ('' = default)")
    parser.add_argument('--json', action='store_true', help='print rows and summary as JSON')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m rsd_ros.refusal_latency',
                                     description=__doc__.split('\n')[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        rows = run(args.runs, args.bytes, args.model_dir)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 1
    result = {'shm_profile': os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'), 'rows': rows,
              'summary': summary(rows)}
    if args.json:
        print(json.dumps(result))
        return 0
    for row in rows:
        print(f"{row['bytes']} bytes: refused {row['refused_ms']:.1f} ms, observed "
              f"{row['observed_ms']:.1f} ms after publish")
    for key, values in result['summary'].items():
        print(f"{key}: median {values['median']:.1f}, min {values['min']:.1f}, "
              f"max {values['max']:.1f}")
    print(f"Fast DDS profile: {result['shm_profile'] or 'none (default 512 KiB segment)'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
