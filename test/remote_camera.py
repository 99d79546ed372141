"""A camera and instruction source on another host (run inside a network namespace by
test_across_hosts.py): publishes frames until a chunk answers one of them, then prints one JSON
line {"chunk_for_sent_frame", "points", "positions", "policy_seen", "seconds"} and exits 0; exits
1 after `timeout` s without a chunk.

    python remote_camera.py NAMESPACE TIMEOUT_S
"""

import json
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory


def main(namespace: str, timeout: float) -> int:
    rclpy.init()
    node = rclpy.create_node('remote_camera', namespace=namespace)
    chunks, sent = [], set()
    node.create_subscription(JointTrajectory, 'action_chunk', chunks.append, 10)
    images = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
    latched = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
    instruction = node.create_publisher(String, 'instruction', latched)
    instruction.publish(String(data='pick up the black bowl and place it on the plate'))
    frame = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    start = time.monotonic()
    next_frame = start
    while time.monotonic() - start < timeout and not chunks:
        if time.monotonic() >= next_frame:
            msg = Image(height=96, width=96, encoding='rgb8', step=96 * 3, data=frame.tobytes())
            msg.header.stamp = node.get_clock().now().to_msg()
            sent.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
            images.publish(msg)
            next_frame += 0.5
        rclpy.spin_once(node, timeout_sec=0.05)
    seen = 'rsd_policy' in node.get_node_names()
    if not chunks:
        print(json.dumps({'chunk_for_sent_frame': False, 'policy_seen': seen}), flush=True)
        return 1
    chunk = chunks[0]
    stamp = (chunk.header.stamp.sec, chunk.header.stamp.nanosec)
    print(json.dumps({'chunk_for_sent_frame': stamp in sent, 'points': len(chunk.points),
                      'positions': len(chunk.points[0].positions), 'policy_seen': seen,
                      'seconds': round(time.monotonic() - start, 2)}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
