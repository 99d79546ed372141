"""`rsd eval-libero`: task success and latency of a policy in LIBERO, through the ROS topics.

Starts the policy (`rsd_policy`, `libero_expert` or any command) once and one `libero_bridge`
per task, as separate processes talking over DDS in a private ROS domain (a free random
ROS_DOMAIN_ID unless one is set; discovery kept on this machine; sim_bridge.eval_processes).
Each bridge runs `--trials` episodes (initial states `--init-state`, +1, ...). With `--arms N`
one `rsd_policy` serves N arms (its `arms` parameter, arm0..armN-1) and N bridges run side by
side, one per arm, the requested episodes dealt to them in consecutive blocks
(sim_bridge.eval_arms); frames of arms that are due together are decoded as one batch. Every
episode is one JSON line in `<out>/results.jsonl` (with several arms, with the `arm` that
ran it), which this command writes as the bridges report and shows as progress. At the end it
writes
`<out>/summary.md` and `<out>/summary.json` (success per task, mean steps, latency percentiles
from header stamps, draft acceptance, mean batch size, held / skipped steps, dropped frames;
sim_bridge.eval_summary) and prints the table. Child logs go to `<out>/logs/`. With `--mcap`
every bridge records each episode as `<out>/mcap/<suite>_task<T>_init<I>_ep<E>.mcap` (ros2
bag's format; the summary lists them).

Exit status: 0 when every episode ran (whatever the task success), 1 on an infrastructure
failure (a process died, no progress within the timeouts, missing results), 2 on bad
arguments, 130 when interrupted.
"""

import argparse
import json
import logging
import os
from pathlib import Path
import shlex
import sys
import time

from sim_bridge.chunk_executor import EXECUTION_HORIZON, chunks_overlap
from sim_bridge.eval_arms import ArmRunner, Run, arm_names, deal_runs, run_arms
from sim_bridge.eval_processes import (
    Child,
    InfrastructureError,
    child_environment,
    console_script,
    pick_domain_id,
    ros_param,
    terminate_as_interrupt,
)
from sim_bridge.eval_summary import markdown_table, summarize

logger = logging.getLogger(__name__)

POLICY_SCRIPTS = {'rsd': 'rsd_policy', 'expert': 'libero_expert'}
BRIDGE_SCRIPT = 'libero_bridge'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd eval-libero` options."""
    parser.add_argument('--suite', default='libero_spatial', help='LIBERO suite')
    parser.add_argument('--tasks', type=int, nargs='+', default=None,
                        help='task indices (default: every task of the suite)')
    parser.add_argument('--trials', type=int, default=1, help='episodes per task')
    parser.add_argument('--init-state', type=int, default=0,
                        help='initial state of the first trial; trial i uses init-state + i')
    parser.add_argument('--realtime', action='store_true',
                        help='run the simulator on the wall clock (default: lockstep)')
    parser.add_argument('--policy', choices=sorted(POLICY_SCRIPTS), default='rsd',
                        help='rsd: the RSD policy node; expert: the scripted expert')
    parser.add_argument('--policy-command', default=None,
                        help='run this command as the policy instead (any node that answers '
                             'camera/image_raw with action_chunk)')
    parser.add_argument('--model', default='', help='main model bundle (default bundle if empty)')
    parser.add_argument('--draft', default='default',
                        help="draft directory ('default' = the bundle's draft)")
    parser.add_argument('--no-draft', action='store_true', help='main-only decoding')
    parser.add_argument('--acceptance', choices=('exact', 'tolerance', 'bounded'),
                        default='exact',
                        help='decoding mode of the policy node (bounded: certified depth)')
    parser.add_argument('--tolerance', type=float, default=0.02,
                        help='tolerance and bounded modes: bound on any action value, action '
                             'units (0.02)')
    parser.add_argument('--device', default='cpu', help='torch device of the policy')
    parser.add_argument('--max-steps', type=int, default=0,
                        help='control steps per episode (0 = the suite horizon)')
    parser.add_argument('--camera-size', type=int, default=128, help='camera image size, px')
    parser.add_argument('--execute', type=int, default=None,
                        help="points of each chunk executed before the bridge observes again "
                             "(the bridge's observation_interval; 0 = the whole chunk; default "
                             f'{EXECUTION_HORIZON}, and the whole chunk for --policy expert)')
    parser.add_argument('--temporal-ensemble', action='store_true',
                        help="lockstep: execute the mean of each new chunk's points and the "
                             "previous chunk's for the same steps (the bridge's "
                             'temporal_ensemble)')
    parser.add_argument('--seed', type=int, default=0, help='scene seed of the bridge')
    parser.add_argument('--chunk-timeout', type=float, default=10.0,
                        help='s without an answer before the bridge republishes')
    parser.add_argument('--startup-timeout', type=float, default=300.0,
                        help='s allowed until the first episode of a task ends')
    parser.add_argument('--episode-timeout', type=float, default=600.0,
                        help='s allowed for each further episode')
    parser.add_argument('--out', type=Path, default=None,
                        help='output directory (default: results/eval_<suite>_<time>)')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')
    parser.add_argument('--video', action='store_true',
                        help='save the first episode as <out>/episode.mp4')
    parser.add_argument('--arms', type=int, default=1,
                        help='arms side by side: N bridges against one rsd_policy serving '
                             'arm0..armN-1, the episodes dealt to them in consecutive blocks')
    parser.add_argument('--batch-window', type=float, default=0.015,
                        help="with --arms: the longest the policy waits for the other arms' "
                             'frames of a batch, s (0..1)')
    parser.add_argument('--mcap', action='store_true',
                        help='record every episode as an MCAP file (the format of ros2 bag, '
                             'Foxglove, the mcap CLI) in <out>/mcap/')


def execution_horizon(args: argparse.Namespace) -> int:
    """Points executed per chunk (0 = all): --execute, else the whole chunk for the scripted
    expert (it plans each chunk from the state its previous chunk ends in) and
    EXECUTION_HORIZON for a learnt policy."""
    if args.execute is not None:
        return args.execute
    return 0 if args.policy == 'expert' and not args.policy_command else EXECUTION_HORIZON


def policy_command(args: argparse.Namespace) -> list[str]:
    """The policy process's command line (--policy-command, or the chosen policy's
    console script with its ROS parameters; with several arms, the arms it serves)."""
    if args.policy_command:
        return shlex.split(args.policy_command)
    script = console_script(POLICY_SCRIPTS[args.policy])
    if args.policy == 'expert':
        return [script]
    draft = '' if args.no_draft else args.draft
    if draft not in ('', 'default'):
        draft = str(Path(draft).resolve())
    model = str(Path(args.model).resolve()) if args.model else ''
    arms = [*ros_param('arms', arm_names(args.arms)),
            *ros_param('batch_window', args.batch_window)] if args.arms > 1 else []
    return [script, '--ros-args', *ros_param('model_dir', model),
            *ros_param('draft_dir', draft), *ros_param('use_draft', not args.no_draft),
            *ros_param('acceptance', args.acceptance), *ros_param('tolerance', [args.tolerance]),
            *ros_param('device', args.device), *arms]


def bridge_command(args: argparse.Namespace, run: Run, results: Path, video: Path | None,
                   mcap_dir: Path | None = None) -> list[str]:
    """The libero_bridge command line for one run, results to `results`, episode recordings
    to `mcap_dir` (None = none); in its arm's namespace when there are several arms."""
    params = {
        'suite': args.suite, 'task_id': run.task_id, 'init_state': run.init_state,
        'seed': args.seed, 'mode': 'realtime' if args.realtime else 'lockstep',
        'max_steps': args.max_steps, 'episodes': run.episodes, 'camera_size': args.camera_size,
        'results_file': str(results), 'chunk_timeout': args.chunk_timeout,
        'video_path': str(video) if video else '',
        'mcap_dir': str(mcap_dir) if mcap_dir else '',
        'observation_interval': execution_horizon(args),
        'temporal_ensemble': args.temporal_ensemble,
    }
    argv = [console_script(BRIDGE_SCRIPT), '--ros-args']
    if args.arms > 1:
        argv += ['-r', f'__ns:=/{arm_names(args.arms)[run.arm]}']
    for name, value in params.items():
        argv += ros_param(name, value)
    return argv


def check_args(args: argparse.Namespace) -> tuple[list[int], list[list[Run]]]:
    """Validate; returns the tasks to run and the runs of each arm. ValueError says what is
    wrong."""
    from sim_bridge.libero_env import num_tasks

    if args.trials < 1:
        raise ValueError(f'--trials must be >= 1, got {args.trials}')
    for name in ('max_steps', 'init_state', 'execute'):
        if (getattr(args, name) or 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.chunk_timeout <= 0 or args.startup_timeout <= 0 or args.episode_timeout <= 0:
        raise ValueError('timeouts must be > 0 s')
    count = num_tasks(args.suite)
    tasks = list(range(count)) if args.tasks is None else list(args.tasks)
    bad = [t for t in tasks if not 0 <= t < count]
    if bad:
        raise ValueError(f'--tasks {bad} out of range: suite {args.suite!r} has tasks '
                         f'0..{count - 1}')
    if len(set(tasks)) != len(tasks):
        raise ValueError(f'--tasks {tasks} lists a task twice')
    if args.no_draft and args.draft != 'default':
        raise ValueError('--draft and --no-draft contradict each other')
    if args.arms > 1 and args.policy == 'expert' and not args.policy_command:
        raise ValueError('--arms: the scripted expert serves one arm; use --policy rsd')
    mode = 'realtime' if args.realtime else 'lockstep'
    if args.temporal_ensemble and not chunks_overlap(mode, execution_horizon(args)):
        raise ValueError('--temporal-ensemble needs lockstep and --execute > 0 (chunks that '
                         'overlap)')
    if not 0 <= args.batch_window <= 1:
        raise ValueError(f'--batch-window must be within 0..1 s, got {args.batch_window}')
    return tasks, deal_runs(tasks, args.trials, args.init_state, args.arms)


def progress_line(record: dict, arms: int) -> str:
    """One finished episode, for the progress output."""
    latency = record['latency_ms']['p50']
    arm = f"arm {record['arm']} " if arms > 1 else ''
    return (f"{arm}task {record['task_id']} init_state {record['init_state']}: "
            f"{'success' if record['success'] else 'failure'} in {record['steps']} steps, "
            f"{record['wall_time_s']:.1f} s, latency p50 "
            f"{'-' if latency is None else f'{latency:.0f} ms'}")


def run(args: argparse.Namespace) -> int:
    """`rsd eval-libero`: evaluate every task, write and print the summary; exit 0, 1 on an
    infrastructure failure, 2 on bad input, 130 when interrupted."""
    from tqdm import tqdm

    try:
        tasks, dealt = check_args(args)
        policy_argv = policy_command(args)
    except (ValueError, InfrastructureError) as exc:
        logger.error('%s', exc)
        return 2
    out = args.out or Path('results') / f"eval_{args.suite}_{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / 'results.jsonl'
    earlier = [results, *(out / 'bridges').glob('arm*.jsonl')]
    earlier += sorted((out / 'mcap').glob('*.mcap*')) if args.mcap else []
    for path in earlier:
        if path.exists():
            logger.info('removing %s, from an earlier run', path)
            path.unlink()
    domain = int(os.environ['ROS_DOMAIN_ID']) if os.environ.get('ROS_DOMAIN_ID') \
        else pick_domain_id()
    env = child_environment(domain)
    config = {
        'suite': args.suite, 'policy': 'command' if args.policy_command else args.policy,
        'mode': 'realtime' if args.realtime else 'lockstep', 'tasks': tasks,
        'trials': args.trials, 'init_state': args.init_state,
        'max_steps': args.max_steps or 'suite horizon', 'model': args.model or 'default',
        'draft': 'none' if args.no_draft else args.draft, 'acceptance': args.acceptance,
        'tolerance': args.tolerance, 'arms': args.arms,
        'execute': execution_horizon(args) or 'chunk',
        'temporal_ensemble': args.temporal_ensemble, 'ros_domain_id': domain,
    }
    logger.info('evaluating %s tasks %s x %d trials (%s, %d arm%s) in ROS domain %d; logs in %s',
                args.suite, tasks, args.trials, config['mode'], args.arms,
                's' if args.arms > 1 else '', domain, out / 'logs')
    mcap_dir = out / 'mcap' if args.mcap else None
    first = dealt[0][0]

    def start_bridge(run: Run, arm_results: Path) -> Child:
        video = out / 'episode.mp4' if args.video and run == first else None
        name = f'bridge (task {run.task_id}, init_state {run.init_state}' + (
            f', arm {run.arm})' if args.arms > 1 else ')')
        return Child.start(name, bridge_command(args, run, arm_results, video, mcap_dir), env,
                           out / 'logs' / f'bridge_task{run.task_id}_init{run.init_state}.log')

    runners = [ArmRunner(runs, start_bridge, out / 'bridges' / f'arm{arm}.jsonl',
                         args.startup_timeout, args.episode_timeout)
               for arm, runs in enumerate(dealt)]
    records: list[dict] = []
    status = 0
    with terminate_as_interrupt():
        policy = Child.start('policy', policy_argv, env, out / 'logs' / 'policy.log')
        try:
            with tqdm(total=len(tasks) * args.trials, desc='episodes', unit='ep',
                      file=sys.stderr) as progress:
                def on_record(arm: int, record: dict) -> None:
                    if args.arms > 1:
                        record = {**record, 'arm': arm}
                    records.append(record)
                    with results.open('a') as stream:
                        stream.write(json.dumps(record) + '\n')
                    progress.write(progress_line(record, args.arms), file=sys.stderr)
                    progress.update()

                run_arms(runners, policy, on_record)
        except InfrastructureError as exc:
            logger.error('%s', exc)
            status = 1
        except KeyboardInterrupt:
            logger.error('interrupted; stopping the processes')
            status = 130
        finally:
            policy.stop()
    summary = summarize(records, tasks, config)
    summary['complete'] = status == 0
    summary['results_file'] = str(results)
    if args.mcap:
        summary['recordings'] = {'dir': str(out / 'mcap'),
                                 'files': [r['mcap_file'] for r in records if r.get('mcap_file')]}
    table = markdown_table(summary)
    (out / 'summary.md').write_text(table)
    (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    print(json.dumps(summary, indent=2) if args.json else table)
    if args.video and (out / 'episode.mp4').exists():
        logger.info('video of the first episode: %s', out / 'episode.mp4')
    logger.info('results in %s', out)
    return status
