"""`rsd record-observations`: render LIBERO observations into an observation directory.

For each task and initial state: load it, settle (objects drop), save the upright agent-view
image; then optionally take a few random actions and save again, `--steps-per-state` images
per state in all. The directory format (docs/ARCHITECTURE.md, "Observation directories"):

    <out>/index.jsonl   {"image": "images/000000.png", "instruction", "suite", "task_id",
                         "init_state", "step", "proprio"} per line; proprio: the arm joint
                         positions (rad) then the gripper finger positions (m), the values
                         the bridge publishes on joint_states
    <out>/images/*.png  RGB uint8, upright

`rsd train-draft` reads it to distil the draft model on realistic prompts. The format is read
and written by `rsd_core.observations` only (a file format, not the policy: no torch).
"""

import argparse
import logging
from pathlib import Path

import numpy as np

from rsd_core.observations import IMAGES, INDEX, ObservationWriter
from sim_bridge.libero_env import ACTION_DIM, GRIPPER_OPEN, LiberoTask, num_tasks

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd record-observations` options."""
    parser.add_argument('--suite', default='libero_spatial', help='LIBERO suite')
    parser.add_argument('--tasks', type=int, nargs='+', default=None,
                        help='task indices (default: every task of the suite)')
    parser.add_argument('--init-states', type=int, nargs='+', default=list(range(10)),
                        help='initial-state indices per task (default: 0..9)')
    parser.add_argument('--steps-per-state', type=int, default=1,
                        help='images per initial state: the settled view, then one after each '
                             'run of --random-steps random actions (default: 1)')
    parser.add_argument('--random-steps', type=int, default=8,
                        help='random actions between two images of one state (default: 8)')
    parser.add_argument('--random-scale', type=float, default=0.5,
                        help='random arm deltas are uniform in [-s, s] (action units, '
                             'default: 0.5); the gripper stays open')
    parser.add_argument('--camera-size', type=int, default=128, help='image size, px')
    parser.add_argument('--seed', type=int, default=0, help='seed of scenes and random actions')
    parser.add_argument('--out', type=Path, required=True, help='observation directory')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing observation directory')


def check_args(args: argparse.Namespace) -> list[int]:
    """Validate the arguments; returns the task list. ValueError says what is wrong."""
    if args.steps_per_state < 1:
        raise ValueError(f'--steps-per-state must be >= 1, got {args.steps_per_state}')
    if args.random_steps < 0 or args.random_scale < 0:
        raise ValueError('--random-steps and --random-scale must be >= 0')
    if args.camera_size < 8:
        raise ValueError(f'--camera-size must be >= 8 px, got {args.camera_size}')
    if min(args.init_states) < 0:
        raise ValueError(f'--init-states must be >= 0, got {args.init_states}')
    count = num_tasks(args.suite)
    tasks = list(range(count)) if args.tasks is None else args.tasks
    bad = [t for t in tasks if not 0 <= t < count]
    if bad:
        raise ValueError(f'--tasks {bad} out of range: suite {args.suite!r} has tasks '
                         f'0..{count - 1}')
    if (args.out / INDEX).exists() and not args.overwrite:
        raise ValueError(f'{args.out} already holds an observation directory; pass --overwrite '
                         'to replace it or choose another --out')
    return tasks


def random_action(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Uniform arm deltas in [-scale, scale], gripper open. [7] float32."""
    action = rng.uniform(-scale, scale, ACTION_DIM).astype(np.float32)
    action[-1] = GRIPPER_OPEN
    return action


def record(args: argparse.Namespace, tasks: list[int]) -> int:
    """Render and write every observation; returns the number written."""
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    total = len(tasks) * len(args.init_states) * args.steps_per_state
    with ObservationWriter(args.out, replace=True) as writer, \
            tqdm(total=total, desc='observations', unit='img') as progress:
        for task_id in tasks:
            with LiberoTask(args.suite, task_id, seed=args.seed,
                            camera_size=args.camera_size) as task:
                progress.set_postfix_str(f'task {task_id}')
                for init_state in args.init_states:
                    obs = task.reset(init_state)
                    for shot in range(args.steps_per_state):
                        if shot:
                            for _ in range(args.random_steps):
                                task.step(random_action(rng, args.random_scale))
                            obs = task.observe()
                        writer.add(obs.image, task.language,
                                   (*obs.robot.joint_pos, *obs.robot.gripper_qpos),
                                   suite=args.suite, task_id=task_id, init_state=init_state,
                                   step=obs.step)
                        progress.update()
    return writer.count


def run(args: argparse.Namespace) -> int:
    """`rsd record-observations`: render and write the observations; exit 2 on bad input."""
    try:
        tasks = check_args(args)
    except ValueError as exc:
        logger.error('%s', exc)
        return 2
    try:
        count = record(args, tasks)
    except ValueError as exc:   # e.g. an initial-state index beyond a task's states
        logger.error('%s', exc)
        return 2
    size = sum(p.stat().st_size for p in (args.out / IMAGES).glob('*.png'))
    logger.info('wrote %d observations (%.1f MB) to %s', count, size / 1e6, args.out)
    return 0
