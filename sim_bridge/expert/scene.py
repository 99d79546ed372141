"""`SceneState`: the privileged state the expert plans from, and its parsing (numpy only).

The bridge publishes it as JSON on `sim/object_poses`; `collect_demos` builds it from
`LiberoTask.robot_state` / `object_poses`. World frame, metres, quaternions xyzw.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from sim_bridge.expert.rotations import quat_to_matrix


@dataclass
class SceneState:
    """Privileged state at one instant (world frame)."""
    eef_pos: np.ndarray                 # [3] m, grip site
    eef_quat: np.ndarray                # [4] xyzw
    gripper_qpos: np.ndarray            # [2] m, finger joints (+open, -open)
    poses: dict[str, np.ndarray]        # name -> [7] (x, y, z, qx, qy, qz, qw)

    def position(self, name: str) -> np.ndarray:
        """World position [3] of `name` (a copy)."""
        return np.array(self.poses[name][:3], dtype=np.float64)

    def rotation(self, name: str) -> np.ndarray:
        """Rotation matrix [3, 3] of object `name`."""
        return quat_to_matrix(self.poses[name][3:7])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> 'SceneState':
        """Parse the privileged-state JSON object of `sim/object_poses`.

        Expected keys: 'objects' {name: [x, y, z, qx, qy, qz, qw]}, 'eef_pos' [3],
        'eef_quat' [4] (xyzw), 'gripper_qpos' [2]. Raises ValueError naming what is wrong.
        """
        missing = [key for key in ('objects', 'eef_pos', 'eef_quat', 'gripper_qpos')
                   if key not in data]
        if missing:
            raise ValueError(f'privileged state lacks {missing}; expected keys objects, '
                             f'eef_pos, eef_quat, gripper_qpos (got {cut(sorted(data))})')
        if not isinstance(data['objects'], dict):
            raise ValueError('objects must be {name: [x, y, z, qx, qy, qz, qw]}, got '
                             f'{cut(data["objects"])}')
        poses = {}
        for name, pose in data['objects'].items():
            pose = _floats(pose)
            if pose.shape != (7,) or not np.isfinite(pose).all():
                raise ValueError(f'pose of {cut(name)} must be 7 finite numbers '
                                 f'[x, y, z, qx, qy, qz, qw], got {cut(data["objects"][name])}')
            poses[name] = pose
        state = cls(eef_pos=_vector(data['eef_pos'], 3, 'eef_pos'),
                    eef_quat=_vector(data['eef_quat'], 4, 'eef_quat'),
                    gripper_qpos=_vector(data['gripper_qpos'], 2, 'gripper_qpos'),
                    poses=poses)
        return state

    @classmethod
    def from_poses(cls, robot: Any, poses: dict[str, tuple[np.ndarray, np.ndarray]],
                   ) -> 'SceneState':
        """From a robot state (eef_pos, eef_quat, gripper_qpos attributes) and name ->
        (pos [3], quat [4] xyzw), as `LiberoTask.robot_state` / `object_poses` give them."""
        return cls(eef_pos=np.asarray(robot.eef_pos, dtype=np.float64),
                   eef_quat=np.asarray(robot.eef_quat, dtype=np.float64),
                   gripper_qpos=np.asarray(robot.gripper_qpos, dtype=np.float64),
                   poses={name: np.concatenate([pos, quat]) for name, (pos, quat)
                          in poses.items()})


def _vector(value: ArrayLike, size: int, name: str) -> np.ndarray:
    """`value` as a float64 vector [size], or ValueError naming `name`."""
    array = _floats(value)
    if array.shape != (size,) or not np.isfinite(array).all():
        raise ValueError(f'{name} must be {size} finite numbers, got {cut(value)}')
    return array


def _floats(value: Any) -> np.ndarray:
    """`value` as a float64 array; an empty one when it is not numbers (a string, an object,
    ragged lists), which every shape check refuses."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return np.empty(0)


def cut(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: what a peer sent, echoed without flooding."""
    text = repr(value)
    return text if len(text) <= limit else f'{text[:limit]}... ({len(text)} characters)'
