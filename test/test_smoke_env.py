"""The environment is real: DDS pub/sub, headless LIBERO, a transformers forward pass."""

import time

import numpy as np
import pytest


def test_image_roundtrip_over_dds(ros_context):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    pub_node = Node('smoke_pub', context=ros_context)
    sub_node = Node('smoke_sub', context=ros_context)
    received = []
    sub_node.create_subscription(Image, 'smoke/image', received.append, qos_profile_sensor_data)
    publisher = pub_node.create_publisher(Image, 'smoke/image', qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(pub_node)
    executor.add_node(sub_node)

    msg = Image(height=4, width=5, encoding='rgb8', step=15)
    payload = bytes(range(60))
    msg.data = payload
    deadline = time.monotonic() + 10.0
    while not received and time.monotonic() < deadline:
        publisher.publish(msg)
        executor.spin_once(timeout_sec=0.1)
    executor.shutdown()
    pub_node.destroy_node()
    sub_node.destroy_node()
    assert received, 'no image arrived over DDS within 10 s'
    assert (received[0].width, received[0].height, bytes(received[0].data)) == (5, 4, payload)


def test_libero_task_resets_and_steps_headless():
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    task = benchmark.get_benchmark_dict()['libero_spatial']().get_task(0)
    bddl = f"{get_libero_path('bddl_files')}/{task.problem_folder}/{task.bddl_file}"
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=64, camera_widths=64)
    try:
        env.seed(0)
        obs = env.reset()
        obs, reward, done, info = env.step(np.zeros(7))
        assert obs['agentview_image'].shape == (64, 64, 3)
        assert np.isfinite(obs['robot0_eef_pos']).all()
    finally:
        env.close()


def test_tiny_transformers_model_forward():
    torch = pytest.importorskip('torch')
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32)
    assert torch.isfinite(logits).all()
