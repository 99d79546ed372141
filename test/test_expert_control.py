"""The expert's hand control (`sim_bridge.expert.control`): model, servo, drift; numpy only."""

import numpy as np
import pytest

from sim_bridge.expert import (
    GRIPPER_OPEN,
    R_DOWN,
    ExpertConfig,
    HandModel,
    hand_yaw,
    learn_drift,
    limit_max,
    rot_z,
    servo,
)


def test_servo_brings_the_modelled_hand_to_the_target_top_down():
    cfg = ExpertConfig()
    model = HandModel(position=np.array([0.0, 0.0, 1.0]), rotation=rot_z(0.3) @ R_DOWN,
                      velocity=np.zeros(3), spin=np.zeros(3), drift=np.zeros(3))
    target = np.array([0.05, -0.03, 0.95])
    for _ in range(100):
        action = servo(model, target, 0.0, GRIPPER_OPEN, 1.0, cfg)
        assert action.shape == (7,) and np.abs(action[:6]).max() <= 1.0 + 1e-12
        assert action[6] == GRIPPER_OPEN
        model.advance(action, cfg)
    assert np.linalg.norm(model.position - target) < 0.002
    assert hand_yaw(model.rotation) == pytest.approx(0.0, abs=0.01)
    assert np.allclose(model.rotation[:, 2], [0.0, 0.0, -1.0], atol=0.01)   # still top-down


def test_servo_speed_caps_the_position_action_and_keeps_its_direction():
    cfg = ExpertConfig()
    model = HandModel(position=np.zeros(3), rotation=R_DOWN, velocity=np.zeros(3),
                      spin=np.zeros(3), drift=np.zeros(3))
    action = servo(model, np.array([0.2, 0.1, 0.0]), None, GRIPPER_OPEN, 0.4, cfg)
    assert action[:3] == pytest.approx([0.4, 0.2, 0.0])
    assert action[3:6] == pytest.approx([0.0, 0.0, 0.0])      # None keeps the yaw
    assert limit_max(np.array([0.5, -0.25])) == pytest.approx([0.5, -0.25])


def test_learn_drift_folds_in_the_per_step_residual_bounded():
    cfg = ExpertConfig()
    drift = np.zeros(3)
    assert learn_drift(drift, None, np.ones(3), cfg) is drift      # nothing predicted yet
    observed = np.array([cfg.chunk_len * 0.001, -1.0, 0.0])       # 1 mm/step, then far off
    drift = learn_drift(drift, np.zeros(3), observed, cfg)
    assert drift == pytest.approx([cfg.drift_gain * 0.001, -cfg.max_drift, 0.0])
