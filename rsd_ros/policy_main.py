"""`rsd_policy`: spin the policy node until a signal, and shut it down without an abort.

SIGINT and SIGTERM (rclpy's handlers) and SIGHUP (handled the same) shut the context down. The
executor returns to Python every SPIN_PERIOD so a Python-level handler (SIGHUP's) runs promptly.
The node then stops publishing at once and waits up to SHUTDOWN_WAIT for a chunk still being
computed; a long prefill cannot be interrupted, so if it is still running the process exits 0
without finalising the interpreter under the inference thread (which would abort, exit -6).
"""

import os
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

from rsd_ros.policy_node import PolicyNode

SHUTDOWN_WAIT = 5.0             # s a chunk in progress may take to finish at shutdown
SPIN_PERIOD = 0.25              # s between returns to Python while spinning


def main(args: list[str] | None = None) -> None:
    """Spin the rsd_policy node until shutdown (args: ROS command line arguments)."""
    try:
        with rclpy.init(args=args) as init:
            context = init.context
            signal.signal(signal.SIGHUP, lambda *_: context.try_shutdown())
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
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == '__main__':
    main()
