"""A LIBERO task as a plain Python object: reset, step without rendering, observe with rendering.

No ROS here. The bridge node, the scripted expert, the demo collector and the observation
recorder all drive LIBERO through `LiberoTask`, so they agree on:

- orientation: `Observation.image` is upright, as a camera delivers it (LIBERO's raw
  agent-view image rotated 180 degrees; `rotate_180` converts either way);
- settling: LIBERO's initial states are not at rest, so `reset` steps `settle_steps` no-op
  actions with the gripper open before the first observation (LIBERO's own evaluation waits
  10 steps); these steps are not counted in `steps`;
- cost: the camera observable is disabled, so `step` is physics only; the camera renders only
  in `observe` / `render`;
- reproducibility: the global numpy generator (which LIBERO's placement samplers use, e.g. for
  fixture positions that the initial states do not store) is seeded from (seed, init_state)
  before every reset, so one (task, init_state, seed) gives one scene.

Actions are OSC_POSE deltas [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]
(gripper -1 open, +1 closed), at LIBERO's control rate of 20 Hz.
"""

import contextlib
from dataclasses import dataclass
import logging
import os
from pathlib import Path
import sys

import numpy as np

from sim_bridge.chunk_executor import GRIPPER_OPEN, hold_action

# Headless rendering by default; must be set before MuJoCo is imported.
os.environ.setdefault('MUJOCO_GL', 'egl')
os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')

logger = logging.getLogger(__name__)

ACTION_DIM = 7
CONTROL_FREQ = 20                      # Hz, LIBERO's default OSC_POSE control rate
CONTROL_PERIOD = 1.0 / CONTROL_FREQ    # s per step
SETTLE_STEPS = 10
CAMERA = 'agentview'

# Episode step limits per suite, as in OpenVLA's LIBERO evaluation (settle steps excluded).
SUITE_HORIZONS = {
    'libero_spatial': 220,
    'libero_object': 280,
    'libero_goal': 300,
    'libero_10': 520,
    'libero_90': 400,
}
DEFAULT_HORIZON = 600


def suite_horizon(suite: str) -> int:
    """Step limit for a suite; variants such as 'libero_spatial_swap' use their base suite's."""
    matches = [name for name in SUITE_HORIZONS if suite == name or suite.startswith(name + '_')]
    if not matches:
        logger.warning('no known step limit for suite %r; using %d steps', suite, DEFAULT_HORIZON)
        return DEFAULT_HORIZON
    return SUITE_HORIZONS[max(matches, key=len)]


def rotate_180(image: np.ndarray) -> np.ndarray:
    """LIBERO's raw camera image <-> upright camera image (the map is its own inverse)."""
    return np.ascontiguousarray(image[::-1, ::-1])


def _release_gl(context) -> None:
    """Unbind an EGL context from the calling thread so that another thread may bind it."""
    if type(context).__name__ != 'EGLGLContext':
        return
    from robosuite.renderers.context import egl_context

    egl = egl_context.EGL
    egl.eglMakeCurrent(egl_context.EGL_DISPLAY, egl.EGL_NO_SURFACE, egl.EGL_NO_SURFACE,
                       egl.EGL_NO_CONTEXT)


def load_suite(suite: str):
    """LIBERO's benchmark object for `suite`; ValueError naming the known suites otherwise."""
    with contextlib.redirect_stdout(sys.stderr):   # LIBERO prints progress notes
        from libero.libero import benchmark

        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f'unknown LIBERO suite {suite!r}; expected one of '
                             f'{", ".join(sorted(suites))}')
        return suites[suite]()


def num_tasks(suite: str) -> int:
    """Number of tasks in a LIBERO suite."""
    return load_suite(suite).get_num_tasks()


@dataclass
class RobotState:
    """Proprioception at one instant, world frame, LIBERO's observation conventions."""
    eef_pos: np.ndarray       # [3] m
    eef_quat: np.ndarray      # [4] xyzw
    gripper_qpos: np.ndarray  # [2] m, finger joints
    joint_pos: np.ndarray     # [7] rad
    joint_vel: np.ndarray     # [7] rad/s


@dataclass
class Observation:
    """What the policy sees after a reset or step."""

    image: np.ndarray         # [H, W, 3] uint8, upright
    robot: RobotState
    step: int                 # policy steps since reset (settle steps excluded)
    sim_time: float           # s of simulated time since the end of settling


@dataclass
class StepResult:
    """Outcome of one policy step."""

    success: bool             # the task's goal predicate holds after this step
    step: int                 # policy steps since reset, this one included


class LiberoTask:
    """One LIBERO task (suite, task_id) with a current initial state, wrapped for stepping.

    Construction builds the MuJoCo scene and render context (~10-20 s); `reset` is cheap
    (a soft reset, ~30 ms, plus the settle steps), so reuse one object across episodes.

    Attributes: `language` (the instruction), `horizon` (suite step limit), `task_name`,
    `init_state`, `steps`, `success`, `last_gripper` (last gripper command), `joint_names`,
    `gripper_joint_names`, and `env`: LIBERO's OffScreenRenderEnv (`env.env` is the robosuite
    environment, `env.env.sim` the MuJoCo sim) for privileged access, e.g. by the expert.
    """

    def __init__(self, suite: str = 'libero_spatial', task_id: int = 0, init_state: int = 0,
                 seed: int = 0, camera_size: int = 128, settle_steps: int = SETTLE_STEPS):
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        benchmark = load_suite(suite)
        if not 0 <= task_id < benchmark.get_num_tasks():
            raise ValueError(f'task_id {task_id} out of range: suite {suite!r} has tasks '
                             f'0..{benchmark.get_num_tasks() - 1}')
        if camera_size < 8:
            raise ValueError(f'camera_size {camera_size} px is too small; expected >= 8')
        if settle_steps < 0:
            raise ValueError(f'settle_steps must be >= 0, got {settle_steps}')
        self.suite = suite
        self.task_id = task_id
        self.seed = seed
        self.camera_size = camera_size
        self.settle_steps = settle_steps
        self.horizon = suite_horizon(suite)
        task = benchmark.get_task(task_id)
        self.task_name: str = task.name
        self.language: str = task.language
        self.init_states = benchmark.get_task_init_states(task_id)  # [N, state] float64
        self.init_state = self._check_init_state(init_state)
        bddl = Path(get_libero_path('bddl_files')) / task.problem_folder / task.bddl_file
        # hard_reset=False: a reset keeps the model and render context (~30 ms instead of
        # ~3 s); ignore_done: the episode length is this wrapper's business, not robosuite's.
        self.env = OffScreenRenderEnv(
            bddl_file_name=str(bddl), camera_names=[CAMERA], camera_heights=camera_size,
            camera_widths=camera_size, hard_reset=False, ignore_done=True)
        self.env.env.modify_observable(f'{CAMERA}_image', 'enabled', False)
        _release_gl(self._gl_context())
        robot = self.env.env.robots[0]
        self.joint_names: list[str] = list(robot.robot_joints)
        self.gripper_joint_names: list[str] = list(robot.gripper_joints)
        self.steps = 0
        self.success = False
        self.last_gripper = GRIPPER_OPEN

    @property
    def num_init_states(self) -> int:
        """Number of initial states the task provides."""
        return len(self.init_states)

    @property
    def sim_time(self) -> float:
        """Simulated seconds since the end of settling."""
        return self.steps * CONTROL_PERIOD

    def _check_init_state(self, index: int) -> int:
        if not 0 <= index < len(self.init_states):
            raise ValueError(f'init_state {index} out of range: task {self.task_id} of '
                             f'{self.suite!r} has initial states 0..{len(self.init_states) - 1}')
        return index

    def reset(self, init_state: int | None = None) -> Observation:
        """Load an initial state (default: the current one), settle, and observe."""
        if init_state is not None:
            self.init_state = self._check_init_state(init_state)
        self.env.seed((self.seed * 1_000_003 + self.init_state) % 2**32)
        self.env.reset()
        # A soft reset keeps the gripper's smoothed command from the last episode; a fresh
        # model starts at zero. Clear it so soft and hard resets give bit-identical physics.
        gripper = self.env.env.robots[0].gripper
        gripper.current_action = np.zeros(gripper.dof)
        self.env.set_init_state(self.init_states[self.init_state])
        settle = hold_action(GRIPPER_OPEN, ACTION_DIM)
        for _ in range(self.settle_steps):
            self.env.step(settle)
        self.steps = 0
        self.success = False
        self.last_gripper = GRIPPER_OPEN
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one OSC_POSE action [7] for one control period (physics only, no render)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f'action must have shape ({ACTION_DIM},), got {action.shape}')
        if not np.isfinite(action).all():
            raise ValueError(f'action has non-finite values: {action.tolist()}')
        _, _, done, _ = self.env.step(action)
        self.steps += 1
        self.last_gripper = float(action[-1])
        self.success = self.success or bool(done)
        return StepResult(success=bool(done), step=self.steps)

    def _gl_context(self):
        return self.env.env.sim._render_context_offscreen.gl_ctx

    def render(self) -> np.ndarray:
        """The agent-view camera image now, upright. [H, W, 3] uint8, ~0.1 s on a CPU.

        Works from any thread: the GL context is bound for the call and released after it
        (rendering with a context bound to another thread silently gives black images).
        """
        context = self._gl_context()
        context.make_current()
        try:
            raw = self.env.env.sim.render(camera_name=CAMERA, width=self.camera_size,
                                          height=self.camera_size)
        finally:
            _release_gl(context)
        return rotate_180(raw)

    def robot_state(self) -> RobotState:
        """Proprioception now (no render)."""
        obs = self.env.env._get_observations(force_update=True)
        return RobotState(
            eef_pos=np.array(obs['robot0_eef_pos'], dtype=np.float64),
            eef_quat=np.array(obs['robot0_eef_quat'], dtype=np.float64),
            gripper_qpos=np.array(obs['robot0_gripper_qpos'], dtype=np.float64),
            joint_pos=np.array(obs['robot0_joint_pos'], dtype=np.float64),
            joint_vel=np.array(obs['robot0_joint_vel'], dtype=np.float64))

    def observe(self) -> Observation:
        """Render the camera and read the robot state: what a policy gets."""
        return Observation(image=self.render(), robot=self.robot_state(), step=self.steps,
                           sim_time=self.sim_time)

    def object_poses(self, include_sites: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Privileged world poses: name -> (pos [3] m, quat [4] xyzw).

        Movable objects and fixtures by their LIBERO names (body poses); with `include_sites`
        also the task's named regions and sites (e.g. 'main_table_plate_region',
        'wooden_cabinet_1_top_region').
        """
        from robosuite.utils import transform_utils

        env = self.env.env
        data = env.sim.data
        poses = {}
        for name, body_id in env.obj_body_id.items():
            quat = transform_utils.convert_quat(np.array(data.body_xquat[body_id]), to='xyzw')
            poses[name] = (np.array(data.body_xpos[body_id]), quat)
        if include_sites:
            for name in env.object_sites_dict:
                if name in poses:
                    continue
                site_id = env.sim.model.site_name2id(name)
                matrix = np.array(data.site_xmat[site_id]).reshape(3, 3)
                poses[name] = (np.array(data.site_xpos[site_id]),
                               transform_utils.mat2quat(matrix))
        return poses

    def close(self) -> None:
        """Close the environment (idempotent)."""
        if getattr(self, 'env', None) is not None:
            self.env.close()
            self.env = None

    def __enter__(self) -> 'LiberoTask':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
