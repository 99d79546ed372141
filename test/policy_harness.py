"""The test side of rsd_policy over real DDS: a PolicyNode in its own context and a camera /
operator node in another, talking through the topics (used by the policy test modules; the
`run_policy` fixture is in conftest.py)."""

import itertools
import json
import os
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from rsd_ros.image_conversion import array_to_imgmsg
from rsd_ros.policy_node import PolicyNode
from rsd_ros.topics import CHUNK_QOS, INSTRUCTION_QOS, SENSOR_QOS, STATS_QOS, stamp_ns

TIMEOUT = 60.0          # s; only reached when something is broken
INSTRUCTION = 'pick up the black bowl and place it on the plate'
_namespaces = itertools.count()


class Policy:
    """A PolicyNode in its own context, spun by a SingleThreadedExecutor on a thread."""

    def __init__(self, namespace: str, **parameters) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = PolicyNode(context=self.context, namespace=namespace, parameter_overrides=[
            Parameter(name, value=value) for name, value in parameters.items()])
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()
        self.thread.join(timeout=10.0)


class Camera(Node):
    """The test side: plays camera and operator, records what the policy publishes. `arm`:
    the policy's arm this camera plays ('' = a policy serving one arm on its own topics)."""

    def __init__(self, context, namespace: str, hardware_id: str, arm: str = '') -> None:
        name = 'test_camera' + (f'_{arm}'.replace('/', '_') if arm else '')
        super().__init__(name, context=context, namespace=namespace)
        self.arm = arm
        self.hardware_id = hardware_id   # /diagnostics is global: keep this policy's status
        self.image_pub = self.create_publisher(Image, self.topic('camera/image_raw'), SENSOR_QOS)
        self.instruction_pub = self.create_publisher(String, self.topic('instruction'),
                                                     INSTRUCTION_QOS)
        self.chunks: list[JointTrajectory] = []
        self.stats: list[dict] = []
        self.diagnostics: list[DiagnosticStatus] = []
        self.from_policy = [
            self.create_subscription(JointTrajectory, self.topic('action_chunk'),
                                     self.chunks.append, CHUNK_QOS),
            self.create_subscription(String, self.topic('policy_stats'),
                                     lambda m: self.stats.append(json.loads(m.data)), STATS_QOS)]
        self.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.spinner = SingleThreadedExecutor(context=context)
        self.spinner.add_node(self)
        self.rng = np.random.default_rng(0)
        self.parameters = AsyncParameterClient(self, f'{namespace}/rsd_policy')

    def close(self) -> None:
        self.spinner.shutdown()
        self.destroy_node()

    def topic(self, name: str) -> str:
        """The relative name of the policy's topic `name` for this camera's arm."""
        return f'{self.arm}/{name}' if self.arm else name

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        self.diagnostics += [s for s in msg.status if s.hardware_id == self.hardware_id and (
            not self.arm or s.name.endswith(f': {self.arm} inference'))]

    def spin_until(self, done, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            self.spinner.spin_once(timeout_sec=0.02)
        return True

    def connect(self, policy: 'Policy | None' = None) -> None:
        """Wait until every endpoint is matched on both sides (or samples may be lost)."""
        def policy_side() -> bool:
            if policy is None:
                return True
            (arm,) = [a for a in policy.node._arms if a.name == self.arm]
            return all(p.get_subscription_count() for p in (arm.chunk_pub, arm.stats_pub))
        assert self.spin_until(lambda: self.image_pub.get_subscription_count() > 0
                               and self.instruction_pub.get_subscription_count() > 0
                               and all(s.get_publisher_count() for s in self.from_policy)
                               and self.diagnostics and policy_side()), \
            'policy node not discovered'

    def instruct(self, text: str = INSTRUCTION) -> None:
        self.instruction_pub.publish(String(data=text))

    def send(self, msg: Image | None = None, age: float = 0.0,
             size: tuple[int, int] = (64, 80)) -> int:
        """Publish an image (a fresh random rgb8 one by default) stamped now - age; its stamp."""
        if msg is None:
            msg = array_to_imgmsg(self.rng.integers(0, 256, size + (3,), dtype=np.uint8))
        stamp = self.get_clock().now() - Duration(seconds=age)
        msg.header.stamp = stamp.to_msg()
        self.image_pub.publish(msg)
        return stamp.nanoseconds

    def chunk_for(self, stamp: int, timeout: float = TIMEOUT) -> tuple[JointTrajectory, dict]:
        """Wait for the chunk and the policy_stats line of the image stamped `stamp`."""
        def found():
            return (any(stamp_ns(c.header.stamp) == stamp for c in self.chunks)
                    and any(self._key(s) == stamp for s in self.stats))
        assert self.spin_until(found, timeout), f'no chunk for the image stamped {stamp}'
        return (next(c for c in self.chunks if stamp_ns(c.header.stamp) == stamp),
                next(s for s in self.stats if self._key(s) == stamp))

    @staticmethod
    def _key(record: dict) -> int:
        return record['stamp']['sec'] * 1_000_000_000 + record['stamp']['nanosec']

    def value(self, key: str) -> str:
        """`key` of the latest diagnostics status."""
        return {kv.key: kv.value for kv in self.diagnostics[-1].values}[key]

    def wait_counter(self, key: str, at_least: int) -> None:
        """Wait until the diagnostics report counter `key` >= at_least."""
        assert self.spin_until(lambda: self.diagnostics and int(self.value(key)) >= at_least), \
            f'diagnostics never reported {key} >= {at_least}'

    def set_parameters(self, **values):
        future = self.parameters.set_parameters(
            [Parameter(name, value=value) for name, value in values.items()])
        assert self.spin_until(future.done), 'parameter service did not answer'
        return future.result().results


def policy_namespace() -> str:
    """A namespace no other test uses."""
    return f'/policy_test_{os.getpid()}_{next(_namespaces)}'
