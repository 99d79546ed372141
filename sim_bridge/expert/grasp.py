"""Grasp planning: which point of the bowl's rim to grip, with which hand yaw.

The black bowl (rim diameter ~10.6 cm) is wider than the open hand (~8 cm between the
fingers): the hand grips its wall with one finger inside, ~3-4 cm above the bowl's origin, in
the bowl's own frame. The finger that goes outside needs free space, so `plan_grasp` chooses
the rim point and hand yaw for clearance (drawer walls, the cabinet, neighbouring objects) and
reach. World frame, metres, radians.
"""

from dataclasses import dataclass
import itertools
import logging

import numpy as np

from sim_bridge.expert.clearance import hand_points, obstacle_boxes
from sim_bridge.expert.config import ExpertConfig
from sim_bridge.expert.goal import Goal
from sim_bridge.expert.rotations import hand_yaw, hand_yaw_target, quat_to_matrix, wrap_angle
from sim_bridge.expert.scene import SceneState

logger = logging.getLogger(__name__)

# LIBERO mounts the Panda's base here in its tabletop scenes; the arm is nearly stretched
# ~0.75 m (horizontally) from it.
ROBOT_BASE = np.array([-0.66, 0.0, 0.912])


@dataclass(frozen=True)
class Grasp:
    """A rim grasp in the bowl's frame: wall direction angle, height above the bowl origin,
    inset of the grip site towards the bowl axis (so the outer finger needs less room)."""
    angle: float             # rad, about the bowl's z axis
    height: float            # m
    inset: float             # m
    clearance: float = 0.0   # m, free space of the hand at and above the grasp when planned

    def site(self, bowl_pos: np.ndarray, bowl_rot: np.ndarray, radius: float,
             ) -> tuple[np.ndarray, float]:
        """(grip-site position [3], hand yaw in [-pi/2, pi/2]) for the bowl's current pose
        (origin [3], rotation [3, 3]) and wall `radius` (m)."""
        radial = bowl_rot @ np.array([np.cos(self.angle), np.sin(self.angle), 0.0])
        horizontal = radial[:2] / max(np.linalg.norm(radial[:2]), 1e-9)
        wall = bowl_pos + bowl_rot @ np.array([radius * np.cos(self.angle),
                                               radius * np.sin(self.angle), self.height])
        position = wall - self.inset * np.array([horizontal[0], horizontal[1], 0.0])
        # Fingers (hand local y) along the radial direction: yaw = direction - 90 deg.
        return position, hand_yaw_target(np.arctan2(horizontal[1], horizontal[0]) - np.pi / 2)


def plan_grasp(state: SceneState, goal: Goal, config: ExpertConfig) -> Grasp:
    """Choose the rim grasp (angle, height, inset) that leaves the hand room and is in reach.

    The open hand is checked at the grasp and along its vertical descent against
    `obstacle_boxes`. Among grasps with at least `min_clearance`, minimise a cost that prefers
    no inset, a low grasp, a short reach from the robot base (at the bowl and, with the same
    hand offset, at the plate: the arm is nearly stretched there), more room (up to 3 cm) and
    little hand rotation; if none has the clearance, take the one with the most.
    """
    bowl, bowl_rot = state.position(goal.obj), state.rotation(goal.obj)
    plate = state.position(goal.target)
    boxes = obstacle_boxes(state, goal)
    current_yaw = hand_yaw(quat_to_matrix(state.eef_quat))
    lift = (0.0, 0.03, 0.06, config.approach_height)
    best, best_key = None, None
    angles = np.arange(config.grasp_directions) * 2 * np.pi / config.grasp_directions
    for height, inset, angle in itertools.product(config.grasp_heights, config.grasp_insets,
                                                  angles):
        grasp = Grasp(angle=float(angle), height=height, inset=inset)
        site, yaw = grasp.site(bowl, bowl_rot, config.wall_radius)
        points = hand_points(site, yaw, lift)
        clearance = min((float(box.distance(points).min()) for box in boxes), default=1.0)
        offset = site[:2] - bowl[:2]
        reach = max(np.linalg.norm(site[:2] - ROBOT_BASE[:2]),
                    np.linalg.norm(plate[:2] + offset - ROBOT_BASE[:2]))
        cost = (inset + 0.5 * (height - min(config.grasp_heights)) + 0.3 * reach
                - min(clearance, 0.03) + 0.01 * abs(wrap_angle(yaw - current_yaw)))
        feasible = clearance >= config.min_clearance
        key = (feasible, -cost) if feasible else (False, clearance)
        if best_key is None or key > best_key:
            best = Grasp(angle=float(angle), height=height, inset=inset, clearance=clearance)
            best_key = key
    if best.clearance < config.min_clearance:
        logger.debug('no grasp of %s keeps %.3f m of clearance; best has %.3f m', goal.obj,
                     config.min_clearance, best.clearance)
    return best
