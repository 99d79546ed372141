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
                             f'eef_pos, eef_quat, gripper_qpos (got {sorted(data)})')
        poses = {}
        for name, pose in data['objects'].items():
            pose = np.asarray(pose, dtype=np.float64)
            if pose.shape != (7,) or not np.isfinite(pose).all():
                raise ValueError(f'pose of {name!r} must be 7 finite numbers '
                                 f'[x, y, z, qx, qy, qz, qw], got {pose.tolist()}')
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
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (size,) or not np.isfinite(array).all():
        raise ValueError(f'{name} must be {size} finite numbers, got {value!r}')
    return array
