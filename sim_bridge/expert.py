"""Scripted pick-and-place expert for libero_spatial, from privileged state (numpy only).

Every libero_spatial task is "pick up the black bowl <somewhere> and place it on the plate"; the
task's BDDL goal, e.g. `(On akita_black_bowl_1 plate_1)`, names which bowl and which plate.
Given the world poses of the objects and the hand, `SpatialExpert.act` returns the next action
chunk [T, 7] in OSC_POSE units (dx, dy, dz, droll, dpitch, dyaw in [-1, 1]; gripper -1 open,
+1 closed), re-planned from the observed state at every chunk.

Phases: settle -> approach (above the grasp point, hand yawed) -> descend -> grasp (close) ->
lift -> carry (bowl above the plate) -> lower -> release (open) -> retreat -> done, with
recover (open, back off, settle, re-plan) when the bowl slips out of the hand.

Facts the geometry rests on (LIBERO's Panda + OSC_POSE at 20 Hz, checked in the simulator):
- a +1 position action moves the hand ~1.2 cm per step (output max 0.05 m, ~24 % reached per
  step); a +1 rotation action turns it ~0.07 rad per step; deltas are in the world frame;
- a top-down hand is quat xyzw (1, 0, 0, 0); its fingers open along its local y axis (world y
  at yaw 0), ~8 cm apart when open; the palm starts 2.4 cm above the grip site;
- the black bowl (rim diameter ~10.6 cm) is wider than the open hand: grasp its wall with one
  finger inside, ~3-4 cm above the bowl's origin, in the bowl's own frame; the finger that
  goes outside needs free space, so the rim point and hand yaw are chosen for clearance
  (drawer walls, the cabinet, neighbouring objects).

World frame, metres, radians; quaternions xyzw (robosuite's observation convention).
"""

from dataclasses import dataclass, field
import enum
import itertools
import logging
import re

import numpy as np

logger = logging.getLogger(__name__)

CHUNK_LEN = 8
ACTION_DIM = 7
GRIPPER_OPEN = -1.0
GRIPPER_CLOSED = 1.0

# Top-down hand at yaw 0 (quat xyzw (1, 0, 0, 0)).
R_DOWN = np.diag([1.0, -1.0, -1.0])

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
# LIBERO mounts the Panda's base here in its tabletop scenes; the arm is nearly stretched
# ~0.75 m (horizontally) from it.
ROBOT_BASE = np.array([-0.66, 0.0, 0.912])


class Phase(enum.Enum):
    """Phases of the expert: SETTLE through RETREAT in pick-and-place order, RECOVER
    (back off after a failed descent or a slipped bowl, then retry), DONE."""

    SETTLE = 'settle'
    APPROACH = 'approach'
    DESCEND = 'descend'
    GRASP = 'grasp'
    LIFT = 'lift'
    CARRY = 'carry'
    LOWER = 'lower'
    RELEASE = 'release'
    RETREAT = 'retreat'
    RECOVER = 'recover'
    DONE = 'done'


@dataclass(frozen=True)
class Goal:
    """What to move where: the BDDL goal `(On obj target)`."""
    obj: str      # e.g. 'akita_black_bowl_1'
    target: str   # e.g. 'plate_1'


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
    def from_dict(cls, data: dict) -> 'SceneState':
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
    def from_poses(cls, robot, poses: dict[str, tuple[np.ndarray, np.ndarray]]) -> 'SceneState':
        """From a robot state (eef_pos, eef_quat, gripper_qpos attributes) and name ->
        (pos [3], quat [4] xyzw), as `LiberoTask.robot_state` / `object_poses` give them."""
        return cls(eef_pos=np.asarray(robot.eef_pos, dtype=np.float64),
                   eef_quat=np.asarray(robot.eef_quat, dtype=np.float64),
                   gripper_qpos=np.asarray(robot.gripper_qpos, dtype=np.float64),
                   poses={name: np.concatenate([pos, quat]) for name, (pos, quat)
                          in poses.items()})


def _vector(value, size: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (size,) or not np.isfinite(array).all():
        raise ValueError(f'{name} must be {size} finite numbers, got {value!r}')
    return array


# ---------------------------------------------------------------- rotations (xyzw quaternions)

def quat_to_matrix(quat) -> np.ndarray:
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
    """Yaw of a (near) top-down hand: angle of its local x axis in the world xy plane."""
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def wrap_angle(angle):
    """Angle(s) in rad wrapped to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


# ---------------------------------------------------------------- goal from LIBERO's task info

_GOAL_ON = re.compile(r'\(\s*on\s+([\w.-]+)\s+([\w.-]+)\s*\)', re.IGNORECASE)


def parse_bddl_goal(bddl_text: str) -> Goal:
    """The `(On obj target)` predicate of a BDDL problem's `(:goal ...)` section."""
    start = bddl_text.lower().find('(:goal')
    if start < 0:
        raise ValueError('BDDL text has no (:goal ...) section')
    match = _GOAL_ON.search(bddl_text, start)
    if match is None:
        raise ValueError(f'BDDL goal has no (On obj target) predicate: '
                         f'{bddl_text[start:start + 200]!r}')
    return Goal(obj=match.group(1), target=match.group(2))


def normalize_instruction(text: str) -> str:
    """Lower case, underscores as spaces, no final period, single spaces."""
    return ' '.join(text.lower().replace('_', ' ').strip().rstrip('.').split())


def resolve_goal(instruction: str, suite: str = 'libero_spatial') -> Goal:
    """Goal of the LIBERO task whose language is `instruction`, from that task's BDDL file.

    Matches the task language (as LIBERO's benchmark and the bridge state it) or the BDDL's own
    `(:language ...)`, case- and whitespace-insensitively. Imports LIBERO (lazily).
    """
    from libero.libero import benchmark, get_libero_path
    import libero.libero.envs.bddl_utils as bddl_utils

    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise ValueError(f'unknown LIBERO suite {suite!r}; expected one of {sorted(suites)}')
    bench = suites[suite]()
    wanted = normalize_instruction(instruction)
    languages = []
    for task_id in range(bench.get_num_tasks()):
        task = bench.get_task(task_id)
        path = f"{get_libero_path('bddl_files')}/{task.problem_folder}/{task.bddl_file}"
        bddl_language = bddl_utils.get_problem_info(path)['language_instruction']
        languages.append(task.language)
        if wanted in (normalize_instruction(task.language), normalize_instruction(bddl_language)):
            with open(path) as bddl:
                return parse_bddl_goal(bddl.read())
    raise ValueError(f'no {suite} task has the instruction {instruction!r}; known: '
                     + '; '.join(languages))


# ---------------------------------------------------------------- clearance geometry

@dataclass(frozen=True)
class Box:
    """Oriented box: world centre [3], rotation [3, 3] (columns = box axes), half sizes [3]."""
    center: np.ndarray
    rotation: np.ndarray
    half: np.ndarray
    name: str = ''

    @classmethod
    def from_bounds(cls, position, rotation, lo, hi, name: str = '') -> 'Box':
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
    """Walls of the drawer of `cabinet` that contains the bowl, if any."""
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
    """Sample points of the open top-down hand at `position`, yaw, raised by each of `lift`.

    Returns [len(lift) * P, 3].
    """
    samples = []
    for lo, hi in HAND_BOXES:
        axes = [np.linspace(lo[i], hi[i], n) for i, n in enumerate((3, 7, 4))]
        samples.append(np.array(list(itertools.product(*axes))))
    local = np.concatenate(samples)                                    # [P, 3]
    world = local @ rot_z(yaw).T + position                           # [P, 3]
    return np.concatenate([world + np.array([0.0, 0.0, dz]) for dz in lift])


# ---------------------------------------------------------------- grasp planning

@dataclass(frozen=True)
class Grasp:
    """A rim grasp in the bowl's frame: wall direction angle, height above the bowl origin,
    inset of the grip site towards the bowl axis (so the outer finger needs less room)."""
    angle: float
    height: float
    inset: float
    clearance: float = 0.0   # m, free space of the hand at and above the grasp when planned

    def site(self, bowl_pos: np.ndarray, bowl_rot: np.ndarray, radius: float,
             ) -> tuple[np.ndarray, float]:
        """(grip-site position [3], hand yaw in [-pi/2, pi/2]) for the bowl's current pose."""
        radial = bowl_rot @ np.array([np.cos(self.angle), np.sin(self.angle), 0.0])
        horizontal = radial[:2] / max(np.linalg.norm(radial[:2]), 1e-9)
        wall = bowl_pos + bowl_rot @ np.array([radius * np.cos(self.angle),
                                               radius * np.sin(self.angle), self.height])
        position = wall - self.inset * np.array([horizontal[0], horizontal[1], 0.0])
        # Fingers (hand local y) along the radial direction: yaw = direction - 90 deg.
        return position, hand_yaw_target(np.arctan2(horizontal[1], horizontal[0]) - np.pi / 2)


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


@dataclass
class _HandModel:
    """Open-loop prediction of the hand inside one chunk: pose and per-step velocities."""
    position: np.ndarray          # [3] m
    rotation: np.ndarray          # [3, 3]
    velocity: np.ndarray          # [3] m/step
    spin: np.ndarray              # [3] rad/step, world frame
    drift: np.ndarray             # [3] m/step the model missed in past chunks

    def advance(self, action: np.ndarray, config: ExpertConfig) -> None:
        self.velocity = config.pos_alpha * self.velocity + config.pos_beta * action[:3]
        spin = config.rot_alpha * self.spin + config.rot_beta * action[3:6]
        self.spin = spin * min(1.0, config.max_spin / max(np.linalg.norm(spin), 1e-12))
        self.position = self.position + self.velocity + self.drift
        self.rotation = matrix_from_rotvec(self.spin) @ self.rotation


@dataclass
class _Plan:
    """Targets fixed when a phase starts (world frame)."""
    grasp: Grasp | None = None
    grasp_site: np.ndarray | None = None
    grasp_yaw: float = 0.0
    hold: np.ndarray | None = None
    carry_target: np.ndarray | None = None     # grip site with the bowl above the plate
    lift_xy: np.ndarray | None = None          # where the hand lifts the bowl
    lower_z: float = 0.0
    pick_z: float = 0.0                        # bowl origin height when the grasp was planned
    settle_ref: dict[str, np.ndarray] = field(default_factory=dict)


class SpatialExpert:
    """Phase machine for "pick up the black bowl ... and place it on the plate".

    `act(state)` -> actions [T, 7] (float32, clipped to [-1, 1]); call it once per chunk with
    the state observed after the previous chunk was executed.
    """

    def __init__(self, goal: Goal, config: ExpertConfig | None = None):
        self.goal = goal
        self.config = config or ExpertConfig()
        self.reset()

    def reset(self) -> None:
        """Start a new episode (same goal)."""
        self.phase = Phase.SETTLE
        self.phase_steps = 0
        self.steps = 0
        self.attempts = 0
        self.plan = _Plan()
        self.history: list[tuple[int, str]] = []   # (step, phase) at each phase change
        self._velocity = np.zeros(3)               # predicted hand velocity at chunk end
        self._spin = np.zeros(3)
        self._drift = np.zeros(3)                  # learnt model bias, m/step
        self._predicted = None                     # predicted hand position at chunk end
        self._enter(Phase.SETTLE)

    @property
    def done(self) -> bool:
        """True in phase DONE: the bowl released and the hand retreated, or the attempts
        used up."""
        return self.phase == Phase.DONE

    # ------------------------------------------------------------ public step

    def act(self, state: SceneState) -> np.ndarray:
        """Next chunk of actions [T, 7] for the observed `state`."""
        for name in (self.goal.obj, self.goal.target):
            if name not in state.poses:
                raise ValueError(f'privileged state has no pose for {name!r}; it has '
                                 f'{sorted(state.poses)}')
        self._learn_drift(state.eef_pos)
        self._observe(state)
        model = _HandModel(position=state.eef_pos.copy(), rotation=quat_to_matrix(state.eef_quat),
                           velocity=self._velocity, spin=self._spin, drift=self._drift)
        rows = []
        for _ in range(self.config.chunk_len):
            target, yaw, gripper = self._command(model)
            speed = self.config.fine_speed if self._near(target, model) else 1.0
            action = self._servo(model, target, yaw, gripper, speed)
            model.advance(action, self.config)
            rows.append(action)
            self.phase_steps += 1
            self.steps += 1
        self._velocity, self._spin = model.velocity, model.spin
        self._predicted = model.position
        return np.clip(np.stack(rows), -1.0, 1.0).astype(np.float32)  # [T, 7]

    def _learn_drift(self, position: np.ndarray) -> None:
        """Integral action: fold what the model mispredicted over the last chunk into a
        per-step bias (gravity sag, cross-axis coupling, contacts), bounded."""
        cfg = self.config
        if self._predicted is not None:
            residual = (position - self._predicted) / cfg.chunk_len
            self._drift = np.clip(self._drift + cfg.drift_gain * residual, -cfg.max_drift,
                                  cfg.max_drift)

    # ------------------------------------------------------------ phase bookkeeping

    def _enter(self, phase: Phase) -> None:
        if phase != self.phase or not self.history:
            logger.debug('step %d: %s -> %s', self.steps, self.phase.value, phase.value)
        self.phase = phase
        self.phase_steps = 0
        self.history.append((self.steps, phase.value))

    def _bowl(self, state: SceneState) -> tuple[np.ndarray, np.ndarray]:
        return state.position(self.goal.obj), state.rotation(self.goal.obj)

    # ------------------------------------------------------------ decisions on observed state

    def _observe(self, state: SceneState) -> None:
        """Phase changes that need the real state; refresh closed-loop targets."""
        cfg = self.config
        bowl, bowl_rot = self._bowl(state)
        plate = state.position(self.goal.target)
        eef = state.eef_pos
        if self.phase == Phase.DONE and not self._placed(bowl, plate):
            if self.attempts + 1 < cfg.max_attempts:
                logger.debug('step %d: bowl not on the plate after release; trying again',
                             self.steps)
                self.attempts += 1
                self.plan = _Plan(hold=eef.copy())
                self._enter(Phase.SETTLE)
        if self.phase == Phase.SETTLE:
            positions = {n: state.position(n) for n in state.poses if not n.endswith('_region')}
            moved = max((np.linalg.norm(positions[n] - p) for n, p in
                         self.plan.settle_ref.items() if n in positions), default=np.inf)
            self.plan.settle_ref = positions
            if self.plan.hold is None:
                self.plan.hold = eef.copy()
            at_rest = moved < cfg.settle_tolerance and self.phase_steps >= cfg.settle_min_steps
            if at_rest or self.phase_steps >= cfg.settle_max_steps:
                self._plan_grasp(state)
                self._enter(Phase.APPROACH)
        if self.phase in (Phase.APPROACH, Phase.DESCEND):
            site, yaw = self.plan.grasp.site(bowl, bowl_rot, cfg.wall_radius)
            if np.linalg.norm(site - self.plan.grasp_site) > 0.03:
                logger.debug('bowl moved %.3f m before the grasp; re-planning',
                             np.linalg.norm(site - self.plan.grasp_site))
                self._plan_grasp(state)
            else:
                self.plan.grasp_site, self.plan.grasp_yaw = site, yaw
            if self.phase == Phase.DESCEND:
                error = self.plan.grasp_site - eef
                logger.debug('step %d: descend error %s', self.steps, np.round(error, 4))
                # Close when on target; after a long descent accept twice the error.
                scale = 2.0 if self.phase_steps >= cfg.descend_patience else 1.0
                if (np.linalg.norm(error[:2]) < scale * cfg.grasp_tolerance
                        and abs(error[2]) < scale * cfg.grasp_z_tolerance):
                    self.plan.hold = self.plan.grasp_site.copy()
                    self._enter(Phase.GRASP)
                elif self.phase_steps >= 2 * cfg.descend_patience:
                    logger.debug('step %d: descent does not converge; backing off', self.steps)
                    self.plan.hold = eef + np.array([0.0, 0.0, 0.06])
                    self._enter(Phase.RECOVER)
        if self.phase in (Phase.LIFT, Phase.CARRY, Phase.LOWER) and (
                np.linalg.norm(eef - bowl) > cfg.lost_distance):
            logger.debug('step %d: bowl slipped (%.3f m from the hand)', self.steps,
                         np.linalg.norm(eef - bowl))
            self.plan.hold = eef + np.array([0.0, 0.0, 0.06])
            self._enter(Phase.RECOVER)
            return
        if self.phase in (Phase.GRASP, Phase.LIFT, Phase.CARRY, Phase.LOWER):
            # Where the hand must be for the bowl to hang above the plate, assuming it moves
            # with the hand.
            to_plate = plate[:2] - bowl[:2]
            carry_z = eef[2] + self._carry_bowl_z(plate) - bowl[2]
            self.plan.carry_target = np.array([eef[0] + to_plate[0], eef[1] + to_plate[1],
                                               carry_z])
            self.plan.lower_z = eef[2] + plate[2] + cfg.place_height - bowl[2]
            low = bowl[2] < plate[2] + cfg.place_height + 0.01
            # The arm may not reach lower near the edge of its workspace: after a while,
            # drop the bowl from where it is if it is over the plate.
            stalled = self.phase_steps >= cfg.lower_patience
            if self.phase == Phase.LOWER and (
                    (low and np.linalg.norm(to_plate) < 0.015)
                    or (stalled and np.linalg.norm(to_plate) < cfg.placed_tolerance)):
                self.plan.hold = eef.copy()
                self._enter(Phase.RELEASE)

    def _placed(self, bowl: np.ndarray, plate: np.ndarray) -> bool:
        """The bowl rests on the plate, near its centre (LIBERO's On: < 3 cm and contact)."""
        return (np.linalg.norm(bowl[:2] - plate[:2]) < self.config.placed_tolerance
                and bowl[2] < plate[2] + self.config.place_height)

    def _carry_bowl_z(self, plate: np.ndarray) -> float:
        return max(plate[2] + self.config.carry_clearance, self.plan.pick_z
                   + self.config.lift_clearance)

    def _plan_grasp(self, state: SceneState) -> None:
        grasp = plan_grasp(state, self.goal, self.config)
        bowl, bowl_rot = self._bowl(state)
        self.plan.grasp = grasp
        self.plan.grasp_site, self.plan.grasp_yaw = grasp.site(bowl, bowl_rot,
                                                               self.config.wall_radius)
        self.plan.pick_z = float(bowl[2])
        logger.debug('grasp %s -> site %s yaw %.2f', grasp, np.round(self.plan.grasp_site, 3),
                     self.plan.grasp_yaw)

    # ------------------------------------------------------------ targets on the predicted hand

    def _command(self, model: _HandModel) -> tuple[np.ndarray, float | None, float]:
        """(target grip-site position [3], target yaw or None to keep it, gripper) for the
        next step."""
        cfg = self.config
        plan = self.plan
        phase = self.phase
        if phase == Phase.APPROACH:
            target = plan.grasp_site + np.array([0.0, 0.0, cfg.approach_height])
            error = target - model.position
            yaw_error = abs(wrap_angle(plan.grasp_yaw - hand_yaw(model.rotation)))
            if np.linalg.norm(error[:2]) < 0.01 and abs(error[2]) < 0.015 and yaw_error < 0.1:
                self._enter(Phase.DESCEND)
                return self._command(model)
            return target, plan.grasp_yaw, GRIPPER_OPEN
        if phase == Phase.DESCEND:
            # A funnel: the further off in xy, the higher the hand stays over the grasp.
            target = plan.grasp_site.copy()
            xy_error = np.linalg.norm(target[:2] - model.position[:2])
            target[2] += min(4.0 * max(0.0, xy_error - 0.004), cfg.approach_height)
            return target, plan.grasp_yaw, GRIPPER_OPEN
        if phase == Phase.GRASP:
            if self.phase_steps >= cfg.close_steps:
                self._enter(Phase.LIFT)
                plan.lift_xy = model.position[:2].copy()
                return self._command(model)
            return plan.hold, plan.grasp_yaw, GRIPPER_CLOSED
        if phase == Phase.LIFT:
            if abs(plan.carry_target[2] - model.position[2]) < 0.02:
                self._enter(Phase.CARRY)
                return self._command(model)
            return np.append(plan.lift_xy, plan.carry_target[2]), None, GRIPPER_CLOSED
        if phase == Phase.CARRY:
            if np.linalg.norm(plan.carry_target[:2] - model.position[:2]) < 0.015:
                self._enter(Phase.LOWER)
                return self._command(model)
            return plan.carry_target, None, GRIPPER_CLOSED
        if phase == Phase.LOWER:
            # Funnel again: a bowl lowered off-centre catches the plate's rim and drags.
            xy_error = np.linalg.norm(plan.carry_target[:2] - model.position[:2])
            lower_z = plan.lower_z + min(4.0 * max(0.0, xy_error - 0.006), cfg.fine_height)
            target = np.array([plan.carry_target[0], plan.carry_target[1], lower_z])
            return target, None, GRIPPER_CLOSED
        if phase == Phase.RELEASE:
            if self.phase_steps >= cfg.open_steps:
                self._enter(Phase.RETREAT)
                plan.hold = plan.hold + np.array([0.0, 0.0, cfg.retreat_height])
                return self._command(model)
            return plan.hold, None, GRIPPER_OPEN
        if phase == Phase.RETREAT:
            if abs(plan.hold[2] - model.position[2]) < 0.01:
                self._enter(Phase.DONE)
            return plan.hold, None, GRIPPER_OPEN
        if phase == Phase.RECOVER:
            if self.phase_steps >= cfg.recover_steps:
                self.attempts += 1
                plan.settle_ref = {}
                self._enter(Phase.SETTLE if self.attempts < cfg.max_attempts else Phase.DONE)
            return plan.hold, None, GRIPPER_OPEN
        # SETTLE, DONE: keep still with the hand open.
        hold = plan.hold if plan.hold is not None else model.position
        return hold, None, GRIPPER_OPEN

    def _near(self, target: np.ndarray, model: _HandModel) -> bool:
        """Close above the grasp or the plate: move slowly (precise, little coupling)."""
        return (self.phase in (Phase.DESCEND, Phase.LOWER)
                and model.position[2] - target[2] < self.config.fine_height)

    def _servo(self, model: _HandModel, target: np.ndarray, yaw: float | None, gripper: float,
               speed: float) -> np.ndarray:
        """Proportional control of the predicted hand towards the target: action [7]
        (position part at most `speed` in each axis, direction kept)."""
        cfg = self.config
        translation = _limit_max((target - model.position) * cfg.pos_gain / speed) * speed
        if yaw is None:   # keep the yaw: turning a held bowl swings it
            yaw = hand_yaw(model.rotation)
        error = rotvec_from_matrix(rot_z(yaw) @ R_DOWN @ model.rotation.T)
        rotation = _limit_max(error * np.array([cfg.tilt_gain, cfg.tilt_gain, cfg.rot_gain]))
        return np.concatenate([translation, rotation, [gripper]])


def _limit_max(action: np.ndarray) -> np.ndarray:
    """Scale into [-1, 1] keeping the direction."""
    return action / max(1.0, float(np.abs(action).max()))


def hand_yaw_target(yaw: float) -> float:
    """The hand is symmetric under a half turn: of yaw and yaw + pi take the one within
    [-pi/2, pi/2] of the neutral hand, which keeps the wrist (joint 7) inside its limits."""
    return float((yaw + np.pi / 2) % np.pi - np.pi / 2)


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
