"""`rsd_policy`: spin the policy node until a signal, and shut it down without an abort.

SIGINT and SIGTERM (rclpy's handlers) shut the context down; SIGHUP is re-raised as SIGTERM,
so it takes exactly that path. (Calling `context.try_shutdown()` from a Python handler instead
destroys every node inside the handler: PolicyNode.destroy_node then waits 10 s for inference,
not SHUTDOWN_WAIT, and the exit below is never reached.) The executor returns to Python every
SPIN_PERIOD so a Python-level handler (SIGHUP's) runs promptly. The node then stops publishing
at once and waits up to SHUTDOWN_WAIT for a chunk still being computed; a long prefill cannot be
interrupted, so if it is still running the process exits 0 with `os._exit`, without finalising
the interpreter under the inference thread (which would abort, exit -6), after destroying its
ROS handles: `os._exit` runs no destructor, so the DDS participant's shared-memory files would
stay in /dev/shm (measured: 11 of the 13 it held, and its peers' port files once they end).
"""

import os
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from rsd_ros.policy_node import PolicyNode

SHUTDOWN_WAIT = 5.0             # s a chunk in progress may take to finish at shutdown
SPIN_PERIOD = 0.25              # s between returns to Python while spinning


def main(args: list[str] | None = None) -> None:
    """Spin the rsd_policy node until shutdown (args: ROS command line arguments)."""
    try:
        with rclpy.init(args=args) as init:
            context = init.context
            signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
            node = PolicyNode()
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                while context.ok():
                    executor.spin_once(timeout_sec=SPIN_PERIOD)   # Python handlers run between
            except RuntimeError:       # rclpy's RCLError: a signal shut the context down
                if context.ok():       # while the executor built its wait set
                    raise
            finally:
                # A signal shuts the context down without destroying its nodes: stop the
                # inference thread before the interpreter exits under it.
                stuck = node.stop_worker(SHUTDOWN_WAIT)
                if stuck:
                    node.get_logger().warning(f'inference still running after {SHUTDOWN_WAIT} s '
                                              'at shutdown; exiting without waiting for it')
                    release_ros_handles(node)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def release_ros_handles(node: PolicyNode) -> None:
    """Destroy the node's ROS handles without waiting for its inference thread, so that the
    DDS participant is deleted and removes its shared-memory files. Both calls are needed
    (rclpy 9): PolicyNode.destroy_node would wait for the thread, and rclpy's LifecycleNode
    leaves its state machine, which holds the rcl node (and so the participant), to the
    garbage collector, which `os._exit` never runs. The thread publishes nothing once the
    context is down."""
    Node.destroy_node(node)
    node._state_machine.destroy_when_not_in_use()


if __name__ == '__main__':
    main()
