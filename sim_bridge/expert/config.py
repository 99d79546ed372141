"""The expert's action format and its tunable geometry and gains (`ExpertConfig`).

Actions are rows [7] in OSC_POSE units: (dx, dy, dz, droll, dpitch, dyaw) in [-1, 1], world
frame, then the gripper (-1 open, +1 closed); a chunk is `chunk_len` rows.
"""

from dataclasses import dataclass

CHUNK_LEN = 8
ACTION_DIM = 7
GRIPPER_OPEN = -1.0
GRIPPER_CLOSED = 1.0


@dataclass
class ExpertConfig:
    """Geometry and gains; lengths in m, angles in rad, times in control steps."""
    chunk_len: int = CHUNK_LEN
    wall_radius: float = 0.045           # bowl wall radius at the grasp heights
    grasp_heights: tuple[float, ...] = (0.03, 0.04)
    grasp_insets: tuple[float, ...] = (0.0, 0.01, 0.02)
    grasp_directions: int = 24
    min_clearance: float = 0.008         # accept a grasp whose hand keeps this much room
    approach_height: float = 0.10        # grip site above the grasp point before descending
    carry_clearance: float = 0.17        # bowl origin above the plate while carrying
    lift_clearance: float = 0.08         # and at least this above where it was picked
    place_height: float = 0.035          # bowl origin above the plate when it is released
    retreat_height: float = 0.08
    placed_tolerance: float = 0.025      # bowl origin to plate centre that counts as placed
    lower_patience: int = 40             # steps of lowering before the bowl is dropped
    settle_tolerance: float = 0.002      # m of object motion per chunk that counts as at rest
    settle_min_steps: int = 8
    settle_max_steps: int = 64
    close_steps: int = 12
    open_steps: int = 8
    recover_steps: int = 10
    max_attempts: int = 3
    grasp_tolerance: float = 0.010       # horizontal grip-site error that allows closing
    grasp_z_tolerance: float = 0.008     # vertical one
    descend_patience: int = 40           # steps of descent after which the tolerance doubles
    lost_distance: float = 0.09          # grip site to bowl origin beyond which it slipped
    # Hand response per control step, fitted in LIBERO (OSC_POSE, 20 Hz):
    # v[t] = alpha v[t-1] + beta a[t] (m/step, rad/step for rotation).
    pos_alpha: float = 0.45
    pos_beta: float = 0.0062
    rot_alpha: float = 0.83
    rot_beta: float = 0.023
    max_spin: float = 0.07               # rad/step: the hand turns no faster
    pos_gain: float = 1.0 / 0.03         # action per m of error (saturates beyond 3 cm)
    drift_gain: float = 0.3              # integral gain on the model's per-step residual
    max_drift: float = 0.003             # m/step
    fine_height: float = 0.04            # above the grasp / release height
    fine_speed: float = 0.4              # max position action near objects (less coupling)
    rot_gain: float = 2.0                # action per rad of yaw error
    tilt_gain: float = 1.0               # action per rad of roll/pitch error: tilting the
                                         # hand swings the grip site, so correct it gently
