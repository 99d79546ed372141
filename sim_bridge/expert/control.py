"""Hand control inside a chunk: an open-loop model of the hand's response and a servo on it.

The expert plans a whole chunk from one observation, so it predicts the hand step by step
(`HandModel.advance`) and servos that prediction towards each step's target (`servo`). What
the model missed over the last chunk is folded into a bounded per-step drift (`learn_drift`).

The response it models (LIBERO's Panda + OSC_POSE at 20 Hz, checked in the simulator): a +1
position action moves the hand ~1.2 cm per step (output max 0.05 m, ~24 % reached per step);
a +1 rotation action turns it ~0.07 rad per step; deltas are in the world frame. Metres,
radians, control steps.
"""

from dataclasses import dataclass

import numpy as np

from sim_bridge.expert.config import ExpertConfig
from sim_bridge.expert.rotations import (
    R_DOWN,
    hand_yaw,
    matrix_from_rotvec,
    rot_z,
    rotvec_from_matrix,
)


@dataclass
class HandModel:
    """Open-loop prediction of the hand inside one chunk: pose and per-step velocities."""
    position: np.ndarray          # [3] m
    rotation: np.ndarray          # [3, 3]
    velocity: np.ndarray          # [3] m/step
    spin: np.ndarray              # [3] rad/step, world frame
    drift: np.ndarray             # [3] m/step the model missed in past chunks

    def advance(self, action: np.ndarray, config: ExpertConfig) -> None:
        """Predict one control step under `action` [7] (first-order response, spin capped)."""
        self.velocity = config.pos_alpha * self.velocity + config.pos_beta * action[:3]
        spin = config.rot_alpha * self.spin + config.rot_beta * action[3:6]
        self.spin = spin * min(1.0, config.max_spin / max(np.linalg.norm(spin), 1e-12))
        self.position = self.position + self.velocity + self.drift
        self.rotation = matrix_from_rotvec(self.spin) @ self.rotation


def learn_drift(drift: np.ndarray, predicted: np.ndarray | None, observed: np.ndarray,
                config: ExpertConfig) -> np.ndarray:
    """Integral action: the per-step bias [3] (m/step) after folding in what the model
    mispredicted over the last chunk (gravity sag, cross-axis coupling, contacts), bounded.

    predicted: the model's hand position [3] at the end of the last chunk (None before the
    first); observed: the hand position [3] actually reached.
    """
    if predicted is None:
        return drift
    residual = (observed - predicted) / config.chunk_len
    return np.clip(drift + config.drift_gain * residual, -config.max_drift, config.max_drift)


def servo(model: HandModel, target: np.ndarray, yaw: float | None, gripper: float,
          speed: float, config: ExpertConfig) -> np.ndarray:
    """Proportional control of the predicted hand towards grip-site `target` [3] and `yaw`
    (rad; None keeps the current one): action [7] (position part at most `speed` in each
    axis, direction kept; the hand kept top-down)."""
    translation = limit_max((target - model.position) * config.pos_gain / speed) * speed
    if yaw is None:   # keep the yaw: turning a held bowl swings it
        yaw = hand_yaw(model.rotation)
    error = rotvec_from_matrix(rot_z(yaw) @ R_DOWN @ model.rotation.T)
    rotation = limit_max(error * np.array([config.tilt_gain, config.tilt_gain,
                                           config.rot_gain]))
    return np.concatenate([translation, rotation, [gripper]])


def limit_max(action: np.ndarray) -> np.ndarray:
    """Scale into [-1, 1] keeping the direction."""
    return action / max(1.0, float(np.abs(action).max()))
