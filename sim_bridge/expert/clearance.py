"""Clearance geometry: oriented boxes of the scene's objects and sample points of the open hand.

`obstacle_boxes` lists what the hand must keep clear of while grasping the goal object (other
objects, fixtures, the walls of a drawer the object sits in, the table top); `hand_points`
samples the open top-down hand; `Box.distance` gives signed distances between the two.

The hand geometry (LIBERO's Panda, checked in the simulator): a top-down hand is quat xyzw
(1, 0, 0, 0); its fingers open along its local y axis (world y at yaw 0), ~8 cm apart when
open; the palm starts 2.4 cm above the grip site. World frame, metres, radians.
"""

from dataclasses import dataclass
import itertools
import re

import numpy as np
from numpy.typing import ArrayLike

from sim_bridge.expert.goal import Goal
from sim_bridge.expert.rotations import quat_to_matrix, rot_z
from sim_bridge.expert.scene import SceneState

# Collision boxes of the open Panda hand around the grip site, top-down at yaw 0: (lo, hi).
HAND_BOXES = (
    ((-0.040, -0.106, 0.024), (0.040, 0.106, 0.126)),    # palm
    ((-0.014, -0.069, -0.013), (0.014, -0.033, 0.049)),  # finger 1
    ((-0.014, 0.033, -0.013), (0.014, 0.069, 0.049)),    # finger 2
)

# Collision-geometry bounding boxes of LIBERO assets in their own body frame: (lo, hi).
OBJECT_BOXES = {
    'akita_black_bowl': ((-0.054, -0.054, 0.002), (0.053, 0.053, 0.052)),
    'glazed_rim_porcelain_ramekin': ((-0.045, -0.044, 0.001), (0.045, 0.045, 0.043)),
    'plate': ((-0.068, -0.068, -0.003), (0.070, 0.069, 0.016)),
    'cookies': ((-0.031, -0.041, -0.009), (0.031, 0.041, 0.009)),
    # Cabinet body with its drawers closed (fronts at y = -0.109).
    'wooden_cabinet': ((-0.123, -0.109, 0.005), (0.131, 0.112, 0.223)),
    'flat_stove': ((-0.052, -0.095, -0.020), (0.245, 0.095, 0.050)),
}
DEFAULT_BOX = ((-0.05, -0.05, 0.0), (0.05, 0.05, 0.08))
# Interior of a cabinet drawer around its region site, in the cabinet's frame: half extents
# (lateral, depth), wall thickness, wall top above the site.
DRAWER_HALF = (0.100, 0.090)
DRAWER_WALL = 0.012
DRAWER_WALL_TOP = 0.031
TABLE_TOP_Z = 0.90


@dataclass(frozen=True)
class Box:
    """Oriented box: world centre [3], rotation [3, 3] (columns = box axes), half sizes [3]."""
    center: np.ndarray
    rotation: np.ndarray
    half: np.ndarray
    name: str = ''

    @classmethod
    def from_bounds(cls, position: ArrayLike, rotation: np.ndarray, lo: ArrayLike,
                    hi: ArrayLike, name: str = '') -> 'Box':
        """The box of local bounds lo..hi [3] of a body at `position` [3] with
        `rotation` [3, 3]."""
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        center = np.asarray(position) + rotation @ ((lo + hi) / 2.0)
        return cls(center=center, rotation=rotation, half=(hi - lo) / 2.0, name=name)

    @property
    def top(self) -> float:
        """World z of the box's highest point."""
        return float(self.center[2] + np.abs(self.rotation[2]) @ self.half)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Signed distance of points [N, 3] to the box (negative inside). [N]"""
        local = np.abs((points - self.center) @ self.rotation) - self.half  # [N, 3]
        outside = np.linalg.norm(np.maximum(local, 0.0), axis=-1)
        return outside + np.minimum(local.max(axis=-1), 0.0)


def category(name: str) -> str:
    """LIBERO instance name -> asset category ('akita_black_bowl_2' -> 'akita_black_bowl')."""
    return re.sub(r'_\d+$', '', name)


def obstacle_boxes(state: SceneState, goal: Goal) -> list[Box]:
    """Boxes the hand must keep clear of while grasping `goal.obj`.

    Every other object and fixture with a body pose (their names have no '_region'/'_side'
    suffix), except supports entirely below the bowl; the walls of a drawer the bowl sits in
    (found from the cabinet's '<cabinet>_<level>_region' site poses); the table top.
    """
    bowl = state.position(goal.obj)
    boxes = [Box(center=np.array([bowl[0], bowl[1], TABLE_TOP_Z - 0.05]), rotation=np.eye(3),
                 half=np.array([1.0, 1.0, 0.05]), name='table')]
    for name, pose in state.poses.items():
        if name == goal.obj or name.endswith(('_region', '_side')):
            continue
        lo, hi = OBJECT_BOXES.get(category(name), DEFAULT_BOX)
        box = Box.from_bounds(pose[:3], quat_to_matrix(pose[3:]), lo, hi, name)
        if box.top <= bowl[2] + 0.01:
            continue   # a support (cookie box, stove) or a flat neighbour below the bowl
        boxes.append(box)
        if category(name) == 'wooden_cabinet':
            boxes.extend(_drawer_walls(state, name, bowl))
    return boxes


def _drawer_walls(state: SceneState, cabinet: str, bowl: np.ndarray) -> list[Box]:
    """Walls of the drawer of `cabinet` that contains the bowl (origin [3]), if any."""
    rotation = state.rotation(cabinet)
    for name, pose in state.poses.items():
        if not (name.startswith(cabinet + '_') and name.endswith('_region')):
            continue
        site = pose[:3]
        lateral, depth = rotation[:, 0], rotation[:, 1]
        offset = bowl - site
        if (abs(offset @ lateral) > DRAWER_HALF[0] or abs(offset @ depth) > DRAWER_HALF[1]
                or not -0.08 < offset[2] < DRAWER_WALL_TOP):
            continue
        z_lo, z_hi = site[2] - 0.04, site[2] + DRAWER_WALL_TOP
        walls = []
        for axis, half in ((0, DRAWER_HALF[0]), (1, DRAWER_HALF[1])):
            other = DRAWER_HALF[1 - axis] + DRAWER_WALL
            for sign in (-1.0, 1.0):
                lo, hi = np.zeros(3), np.zeros(3)
                lo[axis], hi[axis] = sorted((sign * half, sign * (half + DRAWER_WALL)))
                lo[1 - axis], hi[1 - axis] = -other, other
                lo[2], hi[2] = z_lo - site[2], z_hi - site[2]
                walls.append(Box.from_bounds(site, rotation, lo, hi, f'{name}_wall'))
        return walls
    return []


def hand_points(position: np.ndarray, yaw: float, lift: tuple[float, ...]) -> np.ndarray:
    """Sample points of the open top-down hand at grip-site `position` [3] and `yaw` rad,
    raised by each of `lift` (m).

    Returns [len(lift) * P, 3].
    """
    samples = []
    for lo, hi in HAND_BOXES:
        axes = [np.linspace(lo[i], hi[i], n) for i, n in enumerate((3, 7, 4))]
        samples.append(np.array(list(itertools.product(*axes))))
    local = np.concatenate(samples)                                    # [P, 3]
    world = local @ rot_z(yaw).T + position                           # [P, 3]
    return np.concatenate([world + np.array([0.0, 0.0, dz]) for dz in lift])
