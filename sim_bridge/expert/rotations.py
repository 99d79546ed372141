"""Rotations for the expert: xyzw quaternions, matrices, rotation vectors, hand yaw (numpy only).

A top-down hand at yaw 0 is quat xyzw (1, 0, 0, 0), i.e. `R_DOWN`; the yaw of a (near)
top-down hand is the angle of its local x axis in the world xy plane. Angles in rad.
"""

import numpy as np
from numpy.typing import ArrayLike

# Top-down hand at yaw 0 (quat xyzw (1, 0, 0, 0)).
R_DOWN = np.diag([1.0, -1.0, -1.0])


def quat_to_matrix(quat: ArrayLike) -> np.ndarray:
    """Unit quaternion [4] xyzw -> rotation matrix [3, 3]."""
    x, y, z, w = np.asarray(quat, dtype=np.float64) / np.linalg.norm(quat)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rot_z(angle: float) -> np.ndarray:
    """Rotation matrix [3, 3] of `angle` rad about z."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotvec_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] -> rotation vector [3] (axis x angle, angle in [0, pi])."""
    cos = np.clip((np.trace(matrix) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.array([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0],
                     matrix[1, 0] - matrix[0, 1]])
    if angle < 1e-6:
        return axis / 2.0
    if np.pi - angle < 1e-4:   # near a half turn: axis from the symmetric part
        k = int(np.argmax(np.diag(matrix)))
        column = matrix[:, k] + matrix[k, :] - (np.trace(matrix) - 1.0) * np.eye(3)[k]
        unit = column / np.linalg.norm(column)
        return angle * (unit if unit @ axis >= 0 else -unit)
    return angle * axis / (2.0 * np.sin(angle))


def matrix_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vector [3] -> rotation matrix [3, 3] (Rodrigues)."""
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-12:
        return np.eye(3)
    k = rotvec / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * kx + (1.0 - np.cos(angle)) * kx @ kx


def hand_yaw(rotation: np.ndarray) -> float:
    """Yaw (rad) of a (near) top-down hand [3, 3]: angle of its local x axis in the world xy
    plane."""
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def hand_yaw_target(yaw: float) -> float:
    """The hand is symmetric under a half turn: of yaw and yaw + pi take the one within
    [-pi/2, pi/2] of the neutral hand, which keeps the wrist (joint 7) inside its limits."""
    return float((yaw + np.pi / 2) % np.pi - np.pi / 2)


def wrap_angle(angle: ArrayLike) -> np.ndarray:
    """Angle(s) in rad wrapped to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi
