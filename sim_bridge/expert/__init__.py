"""Scripted pick-and-place expert for libero_spatial, from privileged state (numpy only).

Every libero_spatial task is "pick up the black bowl <somewhere> and place it on the plate";
the task's BDDL goal names which bowl and which plate. Given the world poses of the objects and
the hand, `SpatialExpert.act` returns the next action chunk [T, 7] in OSC_POSE units (dx, dy,
dz, droll, dpitch, dyaw in [-1, 1]; gripper -1 open, +1 closed), re-planned from the observed
state at every chunk.

Modules, each with one job (only `phase_machine` keeps state; the rest are plain functions
and data, tested without a simulator):

- `rotations`: quaternions, rotation matrices and vectors, the yaw of a top-down hand;
- `scene`: `SceneState`, the privileged state, parsed from the bridge's JSON;
- `goal`: `Goal` from a task's BDDL file (`resolve_goal` looks the instruction up in LIBERO);
- `clearance`: oriented boxes of the scene and sample points of the open hand;
- `grasp`: `plan_grasp`, the rim point and hand yaw with room for the outer finger;
- `config`: the action format and `ExpertConfig` (geometry, gains, patience);
- `control`: the open-loop hand model and the servo on it that produce each action;
- `phase_machine`: `SpatialExpert`, settle -> approach -> ... -> retreat -> done.

World frame, metres, radians; quaternions xyzw (robosuite's observation convention).
"""

from sim_bridge.expert.clearance import Box, category, hand_points, obstacle_boxes
from sim_bridge.expert.config import (
    ACTION_DIM,
    CHUNK_LEN,
    GRIPPER_CLOSED,
    GRIPPER_OPEN,
    ExpertConfig,
)
from sim_bridge.expert.control import HandModel, learn_drift, limit_max, servo
from sim_bridge.expert.goal import Goal, normalize_instruction, parse_bddl_goal, resolve_goal
from sim_bridge.expert.grasp import ROBOT_BASE, Grasp, plan_grasp
from sim_bridge.expert.phase_machine import Phase, SpatialExpert
from sim_bridge.expert.rotations import (
    R_DOWN,
    hand_yaw,
    hand_yaw_target,
    matrix_from_rotvec,
    quat_to_matrix,
    rot_z,
    rotvec_from_matrix,
    wrap_angle,
)
from sim_bridge.expert.scene import SceneState

__all__ = [
    'ACTION_DIM', 'CHUNK_LEN', 'GRIPPER_CLOSED', 'GRIPPER_OPEN', 'R_DOWN', 'ROBOT_BASE',
    'Box', 'ExpertConfig', 'Goal', 'Grasp', 'HandModel', 'Phase', 'SceneState',
    'SpatialExpert', 'category', 'hand_points', 'hand_yaw', 'hand_yaw_target', 'learn_drift',
    'limit_max', 'matrix_from_rotvec', 'normalize_instruction', 'obstacle_boxes',
    'parse_bddl_goal', 'plan_grasp', 'quat_to_matrix', 'resolve_goal', 'rot_z',
    'rotvec_from_matrix', 'servo', 'wrap_angle',
]
