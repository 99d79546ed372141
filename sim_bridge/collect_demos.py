"""`rsd collect-demos`: scripted-expert demonstrations in LIBERO, written as LIBERO's HDF5.

Runs `SpatialExpert` (privileged state, no ROS, no camera in the loop) on each task and initial
state, recording at every control step the agent-view image and the robot state before the
step, and the action taken. Only successful episodes are kept; an episode ends at the first
step where the task's goal holds, or fails at `--max-steps`.

`--action-noise` (after DART, Laskey et al. 2017) executes a fraction (`--noise-fraction`) of
the expert's chunks with a random offset on the hand's translation (and `--rotation-noise` on
its rotation), one draw per chunk, but records the expert's own actions: the demos then visit
states off the expert's path, as a cloned policy's small errors do, and the chunk after a
perturbed one is the expert's recovery, planned from where the offset left the hand. Inside a
perturbed chunk only the first point is a true label (the expert's plan from the state seen);
at point k the hand has drifted by k offsets that the recorded actions do not correct, so those
steps are marked unlabelled (`labelled` 0) and training does not start samples there (they
still serve as later actions of earlier samples' chunks, which is what the expert planned).
A policy fine-tuned on the first version of these demos (every chunk perturbed, every step
labelled) collapsed (2/50 against 22/50 on libero_spatial initial states 0-4, 2026-12-03).

One file per task, `<out>/<task_name>_demo.hdf5`, in LIBERO's dataset layout:

    data/demo_<i>/actions                [N, 7] float32 (OSC_POSE deltas, gripper -1/+1)
    data/demo_<i>/obs/agentview_rgb      [N, H, W, 3] uint8, LIBERO's raw orientation (absent
                                         with --no-images)
    data/demo_<i>/obs/ee_pos             [N, 3] float64, m
    data/demo_<i>/obs/ee_ori             [N, 3] float64, axis-angle of the hand quaternion
    data/demo_<i>/obs/ee_states          [N, 6] ee_pos + ee_ori
    data/demo_<i>/obs/gripper_states     [N, 2] finger joint positions, m
    data/demo_<i>/obs/joint_states       [N, 7] arm joint positions, rad
    data/demo_<i>/states                 [N, S] flattened MuJoCo states (for replay)
    data/demo_<i>/rewards, dones         [N] uint8, 1 at the last step only
    data/demo_<i>/labelled               [N] uint8, 1 where the action chunk starting at this
                                         step is the expert's plan from this step's state
                                         (0 at a perturbed chunk's later steps;
                                         absent = all 1)
    data/demo_<i> attrs                  num_samples, init_state (the MuJoCo state),
                                         init_state_index, seed, action_noise
                                         ([translation, rotation, fraction]; 0s
                                         for a clean demo)
    data attrs                           problem_info (JSON: problem_name, domain_name,
                                         language_instruction = the task language the bridge
                                         publishes), env_name, env_args (JSON), bddl_file_name,
                                         bddl_file_content, macros_image_convention, num_demos,
                                         total (samples over all demos), expert

`--resume` keeps the demos already in the files and skips their initial states (a demo is
complete once its `num_samples` attribute is written; an interrupted one is dropped).
"""

import argparse
from dataclasses import dataclass, field
import json
import logging
from pathlib import Path
import time

import numpy as np

from sim_bridge.expert import SceneState, SpatialExpert, resolve_goal
from sim_bridge.libero_env import LiberoTask, num_tasks, rotate_180

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd collect-demos` options."""
    parser.add_argument('--suite', default='libero_spatial',
                        help='LIBERO suite (the expert knows libero_spatial)')
    parser.add_argument('--tasks', type=int, nargs='+', default=None,
                        help='task indices (default: every task of the suite)')
    parser.add_argument('--init-states', type=int, nargs='+', default=None,
                        help='initial-state indices per task (default: all of them)')
    parser.add_argument('--out', type=Path, required=True, help='directory of the HDF5 files')
    parser.add_argument('--camera-size', type=int, default=128, help='image size, px')
    parser.add_argument('--max-steps', type=int, default=0,
                        help='control steps before an episode counts as failed '
                             '(default 0: the suite horizon, 220 for libero_spatial)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the scene randomisation')
    parser.add_argument('--no-images', action='store_true',
                        help='record robot state and actions only (no camera; ~10x faster): '
                             'data for fitting an action tokenizer, not a policy')
    parser.add_argument('--resume', action='store_true',
                        help='keep existing demos and skip their initial states')
    parser.add_argument('--action-noise', type=float, default=0.0,
                        help='std of a random offset added to the executed translation '
                             'actions (dx, dy, dz) of a perturbed chunk, drawn once per chunk; '
                             'the recorded actions stay as the expert chose them and the '
                             "perturbed chunk's later steps are marked unlabelled (default 0: "
                             'none)')
    parser.add_argument('--rotation-noise', type=float, default=0.0,
                        help='the same for the rotation actions (droll, dpitch, dyaw)')
    parser.add_argument('--noise-fraction', type=float, default=0.5,
                        help='probability that a chunk is perturbed (with --action-noise or '
                             '--rotation-noise; default 0.5: every other chunk on average is '
                             'executed as planned and labelled throughout)')


def check_args(args: argparse.Namespace) -> list[int]:
    """Validate the arguments; returns the task list. ValueError says what is wrong."""
    if args.camera_size < 8:
        raise ValueError(f'--camera-size must be >= 8 px, got {args.camera_size}')
    if args.max_steps < 0:
        raise ValueError(f'--max-steps must be >= 0 (0 = suite horizon), got {args.max_steps}')
    if not 0.0 <= args.action_noise <= 1.0 or not 0.0 <= args.rotation_noise <= 1.0:
        raise ValueError(f'--action-noise and --rotation-noise must be in [0, 1] action units, '
                         f'got {args.action_noise} and {args.rotation_noise}')
    if not 0.0 < args.noise_fraction <= 1.0:
        raise ValueError(f'--noise-fraction must be in (0, 1], got {args.noise_fraction}')
    if args.init_states is not None and min(args.init_states) < 0:
        raise ValueError(f'--init-states must be >= 0, got {args.init_states}')
    count = num_tasks(args.suite)
    tasks = list(range(count)) if args.tasks is None else args.tasks
    bad = [t for t in tasks if not 0 <= t < count]
    if bad:
        raise ValueError(f'--tasks {bad} out of range: suite {args.suite!r} has tasks '
                         f'0..{count - 1}')
    return tasks


@dataclass(frozen=True)
class ActionNoise:
    """Offsets added to the executed arm actions of perturbed chunks (action units).

    translation, rotation: std of the (dx, dy, dz) and (droll, dpitch, dyaw) offsets; the
    gripper is never perturbed. fraction: probability that a chunk is perturbed (1: every
    chunk; the CLI's default is 0.5). seed: of the draws, with the initial state
    (reproducible per episode, whatever else ran before).
    """
    translation: float = 0.0
    rotation: float = 0.0
    fraction: float = 1.0
    seed: int = 0

    def generator(self, init_state: int) -> np.random.Generator:
        """The draws of one episode."""
        return np.random.default_rng([self.seed, init_state])

    def offset(self, rng: np.random.Generator) -> np.ndarray:
        """One chunk's offset [7]: all 0 for a chunk executed as planned (without noise,
        always), else normal with the stds (gripper 0). One uniform and seven normal draws
        per call either way, so an episode's later chunks do not depend on earlier outcomes."""
        perturbed = rng.random() < self.fraction
        std = np.array([self.translation] * 3 + [self.rotation] * 3 + [0.0])
        return rng.normal(size=7) * std * perturbed

    def record(self) -> list[float]:
        """The demo attribute 'action_noise': [translation, rotation, fraction], the fraction
        0 when nothing is perturbed (so a clean demo reads [0, 0, 0])."""
        fraction = self.fraction if self.translation or self.rotation else 0.0
        return [self.translation, self.rotation, fraction]


@dataclass
class Episode:
    """One expert rollout, recorded before every step."""
    init_state: int
    success: bool = False
    images: list[np.ndarray] = field(default_factory=list)     # [H, W, 3] raw orientation
    ee_pos: list[np.ndarray] = field(default_factory=list)
    ee_ori: list[np.ndarray] = field(default_factory=list)
    gripper: list[np.ndarray] = field(default_factory=list)
    joints: list[np.ndarray] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    labelled: list[bool] = field(default_factory=list)   # the action chunk from here is a plan
    wall_time: float = 0.0

    @property
    def steps(self) -> int:
        """Number of control steps recorded."""
        return len(self.actions)


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Quaternion [4] xyzw -> axis-angle [3] (robosuite's quat2axisangle convention)."""
    quat = np.asarray(quat, dtype=np.float64)
    w = np.clip(quat[3], -1.0, 1.0)
    sin_half = np.sqrt(1.0 - w * w)
    if sin_half < 1e-8:
        return np.zeros(3)
    return quat[:3] * 2.0 * np.arccos(w) / sin_half


def rollout(task: LiberoTask, expert: SpatialExpert, init_state: int, max_steps: int,
            record: bool = True, images: bool = True, noise: ActionNoise | None = None,
            ) -> Episode:
    """Run the expert from `init_state` until success or `max_steps` control steps.

    record: keep the per-step observations (False: just run, for evaluation).
    images: render the camera into the record (False: robot state and actions only, ~10x
    faster; enough to fit an action tokenizer).
    noise: executes some chunks with an offset (`ActionNoise`); the record keeps the expert's
    actions and marks the perturbed chunks' later steps unlabelled; the expert is told
    (`disturbed`) so that it does not learn the offset as drift.
    """
    started = time.perf_counter()
    task.reset(init_state)
    expert.reset()
    episode = Episode(init_state=init_state)
    sim = task.env.env.sim
    noise = noise or ActionNoise()
    rng = noise.generator(init_state)
    while task.steps < max_steps and not episode.success:
        robot = task.robot_state()
        chunk = expert.act(SceneState.from_poses(robot, task.object_poses()))  # [T, 7]
        offset = noise.offset(rng)                                           # [7]
        perturbed = bool(offset.any())
        for k, action in enumerate(chunk):
            if record:
                robot = task.robot_state()
                if images:
                    episode.images.append(rotate_180(task.render()))
                episode.ee_pos.append(robot.eef_pos)
                episode.ee_ori.append(quat_to_axis_angle(robot.eef_quat))
                episode.gripper.append(robot.gripper_qpos)
                episode.joints.append(robot.joint_pos)
                episode.states.append(np.array(sim.get_state().flatten()))
            episode.actions.append(action)
            episode.labelled.append(k == 0 or not perturbed)
            if task.step(np.clip(action + offset, -1.0, 1.0)).success:
                episode.success = True
                break
            if task.steps >= max_steps:
                break
        if perturbed:
            expert.disturbed()
    episode.wall_time = time.perf_counter() - started
    return episode


def demo_path(out: Path, task: LiberoTask) -> Path:
    """The HDF5 file of a task's demos in `out`."""
    return out / f'{task.task_name}_demo.hdf5'


def open_demo_file(path: Path, task: LiberoTask, resume: bool):
    """Open (create or, with resume, reuse) a task's HDF5 file; returns (file, kept init
    states). Without resume an existing file is replaced."""
    import h5py

    if path.exists() and not resume:
        path.unlink()
    hdf5 = h5py.File(path, 'a')
    data = hdf5.require_group('data')
    for name in list(data):
        if 'num_samples' not in data[name].attrs:
            logger.warning('%s: dropping incomplete %s', path, name)
            del data[name]
    kept = {int(data[name].attrs['init_state_index']) for name in data}
    if 'problem_info' not in data.attrs:
        _write_task_attrs(data, task)
    return hdf5, kept


def _write_task_attrs(data, task: LiberoTask) -> None:
    from libero.libero import get_libero_path
    import libero.libero.envs.bddl_utils as bddl_utils

    from sim_bridge.libero_env import CAMERA, CONTROL_FREQ, load_suite

    bench_task = load_suite(task.suite).get_task(task.task_id)
    bddl = Path(get_libero_path('bddl_files')) / bench_task.problem_folder / bench_task.bddl_file
    info = bddl_utils.get_problem_info(str(bddl))
    data.attrs['problem_info'] = json.dumps({
        'problem_name': info['problem_name'], 'domain_name': info['domain_name'],
        'language_instruction': task.language})
    data.attrs['env_name'] = info['problem_name']
    data.attrs['env_args'] = json.dumps({
        'type': 1, 'env_name': info['problem_name'], 'problem_name': info['problem_name'],
        'bddl_file': str(bddl), 'env_kwargs': {
            'robots': ['Panda'], 'controller': 'OSC_POSE', 'control_freq': CONTROL_FREQ,
            'camera_names': [CAMERA], 'camera_heights': task.camera_size,
            'camera_widths': task.camera_size}})
    data.attrs['bddl_file_name'] = str(bddl)
    data.attrs['bddl_file_content'] = bddl.read_text()
    data.attrs['macros_image_convention'] = 'opengl'   # raw LIBERO images: upside down
    data.attrs['expert'] = 'sim_bridge.expert.SpatialExpert (privileged state)'
    data.attrs['suite'] = task.suite
    data.attrs['task_id'] = task.task_id
    data.attrs['num_demos'] = 0
    data.attrs['total'] = 0


def write_demo(hdf5, episode: Episode, init_state: np.ndarray, seed: int,
               noise: ActionNoise | None = None) -> str:
    """Append a successful episode as data/demo_<i>; returns the group name."""
    data = hdf5['data']
    index = 0
    while f'demo_{index}' in data:
        index += 1
    group = data.create_group(f'demo_{index}')
    obs = group.create_group('obs')
    ee_pos = np.stack(episode.ee_pos)                                 # [N, 3]
    ee_ori = np.stack(episode.ee_ori)                                 # [N, 3]
    if episode.images:
        obs.create_dataset('agentview_rgb', data=np.stack(episode.images), compression='gzip',
                           compression_opts=4)                       # [N, H, W, 3]
    obs.create_dataset('ee_pos', data=ee_pos)
    obs.create_dataset('ee_ori', data=ee_ori)
    obs.create_dataset('ee_states', data=np.concatenate([ee_pos, ee_ori], axis=1))
    obs.create_dataset('gripper_states', data=np.stack(episode.gripper))
    obs.create_dataset('joint_states', data=np.stack(episode.joints))
    group.create_dataset('actions', data=np.stack(episode.actions).astype(np.float32))
    group.create_dataset('states', data=np.stack(episode.states))
    marks = np.zeros(episode.steps, dtype=np.uint8)
    marks[-1] = 1
    group.create_dataset('rewards', data=marks)
    group.create_dataset('dones', data=marks)
    group.create_dataset('labelled', data=np.array(episode.labelled, dtype=np.uint8))
    group.attrs['init_state'] = init_state
    group.attrs['init_state_index'] = episode.init_state
    group.attrs['seed'] = seed
    group.attrs['action_noise'] = (noise or ActionNoise()).record()
    group.attrs['num_samples'] = episode.steps     # last: marks the demo complete
    data.attrs['num_demos'] = len(data)
    data.attrs['total'] = int(sum(data[name].attrs['num_samples'] for name in data))
    hdf5.flush()
    return group.name


@dataclass
class TaskSummary:
    """Demo collection of one task: episodes kept, failed, skipped (already written),
    steps and wall-clock seconds of each episode run."""

    task_id: int
    name: str
    kept: int = 0
    failed: int = 0
    skipped: int = 0
    steps: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


def collect_task(task: LiberoTask, init_states: list[int] | None, out: Path, max_steps: int,
                 resume: bool, seed: int, progress=None, images: bool = True,
                 noise: ActionNoise | None = None) -> TaskSummary:
    """Collect the demos of one task into its HDF5 file (images=False: no camera; noise:
    executed offsets, `ActionNoise`)."""
    goal = resolve_goal(task.language, task.suite)
    expert = SpatialExpert(goal)
    states = list(range(task.num_init_states)) if init_states is None else init_states
    bad = [s for s in states if s >= task.num_init_states]
    if bad:
        raise ValueError(f'--init-states {bad} out of range: task {task.task_id} has initial '
                         f'states 0..{task.num_init_states - 1}')
    summary = TaskSummary(task_id=task.task_id, name=task.task_name)
    out.mkdir(parents=True, exist_ok=True)
    hdf5, kept = open_demo_file(demo_path(out, task), task, resume)
    try:
        for init_state in states:
            if init_state in kept:
                summary.skipped += 1
            else:
                episode = rollout(task, expert, init_state, max_steps or task.horizon,
                                  images=images, noise=noise)
                summary.wall.append(episode.wall_time)
                if episode.success:
                    write_demo(hdf5, episode, task.init_states[init_state], seed, noise)
                    kept.add(init_state)
                    summary.kept += 1
                    summary.steps.append(episode.steps)
                else:
                    summary.failed += 1
                    logger.info('task %d init_state %d: no success within %d steps (expert '
                                'ended in %s); not kept', task.task_id, init_state,
                                episode.steps, expert.phase.value)
            if progress is not None:
                progress.update()
                progress.set_postfix_str(f'task {task.task_id} kept {summary.kept} '
                                         f'failed {summary.failed}')
    finally:
        hdf5.close()
    return summary


def print_summary(summaries: list[TaskSummary]) -> None:
    """Print one line per task and the totals."""
    print(f'{"task":>4}  {"kept":>4}  {"failed":>6}  {"skipped":>7}  {"steps":>6}  '
          f'{"s/ep":>5}  name')
    for s in summaries:
        steps = f'{np.mean(s.steps):.0f}' if s.steps else '-'
        wall = f'{np.median(s.wall):.1f}' if s.wall else '-'
        print(f'{s.task_id:>4}  {s.kept:>4}  {s.failed:>6}  {s.skipped:>7}  {steps:>6}  '
              f'{wall:>5}  {s.name}')
    kept = sum(s.kept for s in summaries)
    tried = kept + sum(s.failed for s in summaries)
    print(f'kept {kept} of {tried} episodes run '
          f'({sum(s.skipped for s in summaries)} already written)')


def run(args: argparse.Namespace) -> int:
    """`rsd collect-demos`: collect every task, print the summary; exit 2 on bad input."""
    from tqdm import tqdm

    try:
        tasks = check_args(args)
    except ValueError as exc:
        logger.error('%s', exc)
        return 2
    summaries = []
    noise = ActionNoise(args.action_noise, args.rotation_noise, args.noise_fraction, args.seed)
    with tqdm(total=None if args.init_states is None else len(tasks) * len(args.init_states),
              desc='episodes', unit='ep') as progress:
        for task_id in tasks:
            with LiberoTask(args.suite, task_id, seed=args.seed,
                            camera_size=args.camera_size) as task:
                try:
                    summaries.append(collect_task(task, args.init_states, args.out,
                                                  args.max_steps, args.resume, args.seed,
                                                  progress, images=not args.no_images,
                                                  noise=noise))
                except ValueError as exc:
                    logger.error('%s', exc)
                    return 2
    print_summary(summaries)
    return 0
