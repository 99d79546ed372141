"""`rsd eval-libero`: task success and latency of a policy in LIBERO, through the ROS topics.

Starts the policy (`rsd_policy`, `libero_expert` or any command) once and one `libero_bridge`
per task, as separate processes talking over DDS in a private ROS domain (a free random
ROS_DOMAIN_ID unless one is set; discovery kept on this machine). Each bridge runs `--trials`
episodes (initial states `--init-state`, +1, ...) and appends one JSON line per episode to
`<out>/results.jsonl`, which this command follows to show progress. At the end it writes
`<out>/summary.md` and `<out>/summary.json` (success per task, mean steps, latency percentiles
from header stamps, draft acceptance, held / skipped steps, dropped frames) and prints the
table. Child logs go to `<out>/logs/`. With `--mcap` every bridge records each episode as
`<out>/mcap/<suite>_task<T>_init<I>_ep<E>.mcap` (ros2 bag's format; the summary lists them).

Exit status: 0 when every episode ran (whatever the task success), 1 on an infrastructure
failure (a process died, no progress within the timeouts, missing results), 2 on bad
arguments, 130 when interrupted.
"""

import argparse
from dataclasses import dataclass
import json
import logging
import os
from pathlib import Path
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

logger = logging.getLogger(__name__)

POLICY_SCRIPTS = {'rsd': 'rsd_policy', 'expert': 'libero_expert'}
BRIDGE_SCRIPT = 'libero_bridge'


class InfrastructureError(RuntimeError):
    """The evaluation could not run (as opposed to a policy failing its task)."""


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
    parser.add_argument('--mcap', action='store_true',
                        help='record every episode as an MCAP file (the format of ros2 bag, '
                             'Foxglove, the mcap CLI) in <out>/mcap/')


# --- processes ---------------------------------------------------------------------------------

def console_script(name: str) -> str:
    """Path of an installed console script: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise InfrastructureError(f'console script {name!r} not found beside {sys.executable} '
                                  'or on PATH; install the package (pip install -e . or colcon '
                                  'build and source the workspace)')
    return found


def domain_in_use(domain_id: int, participants: int = 4) -> bool:
    """Whether a local DDS participant seems to use `domain_id`.

    RTPS participant i of domain d binds the unicast discovery port 7410 + 250 d + 2 i; if we
    cannot bind one of the first few, someone is there.
    """
    for index in range(participants):
        port = 7410 + 250 * domain_id + 2 * index
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(('0.0.0.0', port))
            except OSError:
                return True
    return False


def pick_domain_id(rng: random.Random | None = None) -> int:
    """A random ROS_DOMAIN_ID in 1..101 that no local participant seems to use."""
    rng = rng or random.Random()
    for candidate in rng.sample(range(1, 102), 101):
        if not domain_in_use(candidate):
            return candidate
    raise InfrastructureError('every ROS_DOMAIN_ID in 1..101 seems to be in use')


def child_environment(domain_id: int) -> dict[str, str]:
    """Environment of the policy and bridge processes: ROS domain `domain_id`,
    localhost discovery, FastDDS, EGL rendering, unbuffered output."""
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env.setdefault('MUJOCO_GL', 'egl')
    env.setdefault('PYOPENGL_PLATFORM', 'egl')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def ros_param(name: str, value) -> list[str]:
    """`-p name:=value` with the value written as YAML of its own type."""
    if isinstance(value, bool):
        text = 'true' if value else 'false'
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = '[' + ', '.join(json.dumps(v) for v in value) + ']'
    else:
        text = "'" + str(value).replace("'", "''") + "'"
    return ['-p', f'{name}:={text}']


@dataclass
class Child:
    """A child process whose output goes to a log file."""
    name: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], log: Path) -> 'Child':
        """Start `argv` in its own session, output to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        logger.debug('starting %s: %s', name, shlex.join(argv))
        with open(log, 'w') as stream:
            process = subprocess.Popen(argv, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, process, log)

    def exited(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0),
                          (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                logger.warning('%s did not exit within %.0f s of %s', self.name, wait,
                               signal.Signals(sig).name)
        return self.process.returncode

    def tail(self, lines: int = 15) -> str:
        """The last `lines` lines of the log, indented."""
        try:
            text = self.log.read_text(errors='replace').splitlines()
        except OSError:
            return ''
        return '\n'.join('    ' + line for line in text[-lines:])


def policy_command(args: argparse.Namespace) -> list[str]:
    """The policy process's command line (--policy-command, or the chosen policy's
    console script with its ROS parameters)."""
    if args.policy_command:
        return shlex.split(args.policy_command)
    script = console_script(POLICY_SCRIPTS[args.policy])
    if args.policy == 'expert':
        return [script]
    draft = '' if args.no_draft else args.draft
    if draft not in ('', 'default'):
        draft = str(Path(draft).resolve())
    model = str(Path(args.model).resolve()) if args.model else ''
    return [script, '--ros-args', *ros_param('model_dir', model),
            *ros_param('draft_dir', draft), *ros_param('use_draft', not args.no_draft),
            *ros_param('acceptance', args.acceptance), *ros_param('tolerance', [args.tolerance]),
            *ros_param('device', args.device)]


def bridge_command(args: argparse.Namespace, task_id: int, results: Path,
                   video: Path | None, mcap_dir: Path | None = None) -> list[str]:
    """The libero_bridge command line for one task, results to `results`, episode recordings
    to `mcap_dir` (None = none)."""
    params = {
        'suite': args.suite, 'task_id': task_id, 'init_state': args.init_state,
        'seed': args.seed, 'mode': 'realtime' if args.realtime else 'lockstep',
        'max_steps': args.max_steps, 'episodes': args.trials, 'camera_size': args.camera_size,
        'results_file': str(results), 'chunk_timeout': args.chunk_timeout,
        'video_path': str(video) if video else '',
        'mcap_dir': str(mcap_dir) if mcap_dir else '',
    }
    argv = [console_script(BRIDGE_SCRIPT), '--ros-args']
    for name, value in params.items():
        argv += ros_param(name, value)
    return argv


class ResultsFollower:
    """Reads the complete JSON lines appended to a results file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict]:
        """The JSON records of the lines completed since the last call."""
        if not self.path.exists():
            return []
        with open(self.path) as stream:
            stream.seek(self.offset)
            text = stream.read()
        complete = text[:text.rfind('\n') + 1]
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


# --- summary -----------------------------------------------------------------------------------

def _stat_sum(records: list[dict], key: str) -> float | None:
    values = [r['policy_stats']['sums'][key] for r in records
              if r.get('policy_stats') and key in r['policy_stats']['sums']]
    return sum(values) if values else None


def _last_counter(records: list[dict], key: str) -> float | None:
    values = [r['policy_stats']['last'][key] for r in records
              if r.get('policy_stats') and isinstance(r['policy_stats']['last'].get(key),
                                                      (int, float))]
    return max(values) if values else None


def summarize_records(records: list[dict]) -> dict:
    """Aggregate episode records: success, steps, latency, acceptance, bridge counters."""
    latencies = [v for r in records for v in r.get('latencies_ms', [])]
    proposed = _stat_sum(records, 'layers_proposed')
    accepted = _stat_sum(records, 'layers_accepted')
    successes = sum(bool(r['success']) for r in records)
    p50, p90 = np.percentile(latencies, [50, 90]) if latencies else (None, None)
    return {
        'episodes': len(records), 'successes': successes,
        'success_rate': successes / len(records) if records else None,
        'mean_steps': float(np.mean([r['steps'] for r in records])) if records else None,
        'latency_p50_ms': None if p50 is None else float(p50),
        'latency_p90_ms': None if p90 is None else float(p90),
        'chunks': len(latencies),
        'acceptance_rate': accepted / proposed if proposed else None,
        'held_steps': sum(r['held_steps'] for r in records),
        'skipped_steps': sum(r['skipped_steps'] for r in records),
        'rejected_chunks': sum(r['rejected_chunks'] for r in records),
        'wall_time_s': sum(r['wall_time_s'] for r in records),
    }


def summarize(records: list[dict], tasks: list[int], config: dict) -> dict:
    """Per-task rows (in `tasks` order) and an overall row.

    Dropped frames come from the policy's cumulative `dropped` counter (its policy_stats),
    differenced between the ends of consecutive tasks since one policy serves them all.
    """
    rows, previous_dropped = [], 0.0
    for task_id in tasks:
        mine = [r for r in records if r['task_id'] == task_id]
        row = {'task_id': task_id, 'task': mine[0]['task'] if mine else None,
               **summarize_records(mine)}
        dropped = _last_counter(mine, 'dropped')
        row['dropped_frames'] = None if dropped is None else dropped - previous_dropped
        previous_dropped = previous_dropped if dropped is None else dropped
        rows.append(row)
    overall = summarize_records(records)
    dropped = [row['dropped_frames'] for row in rows if row['dropped_frames'] is not None]
    overall['dropped_frames'] = sum(dropped) if dropped else None
    return {'config': config, 'tasks': rows, 'overall': overall}


def _cell(value, fmt: str = '{:.1f}') -> str:
    return '-' if value is None else fmt.format(value)


def markdown_table(summary: dict) -> str:
    """The summary as a markdown report: settings, then one row per task."""
    config = summary['config']
    lines = [
        f"# LIBERO evaluation: {config['suite']}, policy {config['policy']}, {config['mode']}",
        '',
        ', '.join(f'{k}: {v}' for k, v in config.items() if k not in ('suite', 'policy')),
        '',
        '| task | episodes | success | mean steps | latency p50 (ms) | latency p90 (ms) '
        '| acceptance | held | skipped | rejected | dropped frames |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in [*summary['tasks'], {'task_id': 'all', **summary['overall']}]:
        rate = row['success_rate']
        success = '-' if rate is None else f"{row['successes']}/{row['episodes']} ({rate:.0%})"
        lines.append(
            f"| {row['task_id']} | {row['episodes']} | {success} | {_cell(row['mean_steps'])} "
            f"| {_cell(row['latency_p50_ms'])} | {_cell(row['latency_p90_ms'])} "
            f"| {_cell(row['acceptance_rate'], '{:.1%}')} | {row['held_steps']} "
            f"| {row['skipped_steps']} | {row['rejected_chunks']} "
            f"| {_cell(row['dropped_frames'], '{:.0f}')} |")
    names = [f"{row['task_id']}: {row['task']}" for row in summary['tasks'] if row['task']]
    if names:
        lines += ['', 'Tasks: ' + '; '.join(names)]
    recordings = summary.get('recordings')
    if recordings:
        lines += ['', f"Episode recordings: {len(recordings['files'])} MCAP files in "
                      f"{recordings['dir']} (ros2 bag info FILE, Foxglove, mcap info FILE)"]
    return '\n'.join(lines) + '\n'


# --- the command -------------------------------------------------------------------------------

def check_args(args: argparse.Namespace) -> list[int]:
    """Validate; returns the tasks to run. ValueError says what is wrong."""
    from sim_bridge.libero_env import num_tasks

    if args.trials < 1:
        raise ValueError(f'--trials must be >= 1, got {args.trials}')
    for name in ('max_steps', 'init_state'):
        if getattr(args, name) < 0:
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
    return tasks


def run_task(args, task_id: int, policy: Child, env: dict, out: Path, follower, progress,
             records: list[dict]) -> None:
    """One bridge process for one task; appends its records. Raises InfrastructureError."""
    video = out / 'episode.mp4' if args.video and not records else None
    if policy.exited() is not None:
        raise InfrastructureError(f'the policy exited with status {policy.exited()}; last '
                                  f'lines of {policy.log}:\n{policy.tail()}')
    mcap_dir = out / 'mcap' if args.mcap else None
    bridge = Child.start(f'bridge (task {task_id})',
                         bridge_command(args, task_id, follower.path, video, mcap_dir), env,
                         out / 'logs' / f'bridge_task{task_id}.log')
    done, bridge_exited = 0, False
    deadline = time.monotonic() + args.startup_timeout
    try:
        while done < args.trials:
            for record in follower.new_records():
                records.append(record)
                done += 1
                deadline = time.monotonic() + args.episode_timeout
                latency = record['latency_ms']['p50']
                progress.write(
                    f"task {record['task_id']} init_state {record['init_state']}: "
                    f"{'success' if record['success'] else 'failure'} in {record['steps']} "
                    f"steps, {record['wall_time_s']:.1f} s, latency p50 "
                    f"{'-' if latency is None else f'{latency:.0f} ms'}", file=sys.stderr)
                progress.update()
            if done >= args.trials:
                break
            code = bridge.exited()
            if code is not None:
                if not bridge_exited:     # read once more: it may have finished meanwhile
                    bridge_exited = True
                    continue
                raise InfrastructureError(
                    f'{bridge.name} exited with status {code} after {done} of {args.trials} '
                    f'episodes; last lines of {bridge.log}:\n{bridge.tail()}')
            if policy.exited() is not None:
                raise InfrastructureError(
                    f'the policy exited with status {policy.exited()}; last lines of '
                    f'{policy.log}:\n{policy.tail()}')
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f'{bridge.name}: no episode finished in time ({done} of {args.trials} done)'
                    f'; last lines of {bridge.log}:\n{bridge.tail()}')
            time.sleep(0.5)
        try:
            bridge.process.wait(30.0)
        except subprocess.TimeoutExpired:
            logger.warning('%s still running after its last episode; stopping it', bridge.name)
    finally:
        code = bridge.stop()
    if code not in (0, None):
        raise InfrastructureError(f'{bridge.name} exited with status {code}; see {bridge.log}')


def run(args: argparse.Namespace) -> int:
    """`rsd eval-libero`: evaluate every task, write and print the summary; exit 0, 1 on an
    infrastructure failure, 2 on bad input, 130 when interrupted."""
    from tqdm import tqdm

    try:
        tasks = check_args(args)
        policy_argv = policy_command(args)
    except (ValueError, InfrastructureError) as exc:
        logger.error('%s', exc)
        return 2
    out = args.out or Path('results') / f"eval_{args.suite}_{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / 'results.jsonl'
    if results.exists():
        logger.info('replacing the results of an earlier run in %s', out)
        results.unlink()
    for path in sorted((out / 'mcap').glob('*.mcap*')) if args.mcap else []:
        logger.info('removing %s, a recording of an earlier run', path)
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
        'tolerance': args.tolerance,
        'ros_domain_id': domain,
    }
    logger.info('evaluating %s tasks %s x %d trials (%s) in ROS domain %d; logs in %s',
                args.suite, tasks, args.trials, config['mode'], domain, out / 'logs')
    records: list[dict] = []
    status = 0
    policy = Child.start('policy', policy_argv, env, out / 'logs' / 'policy.log')
    follower = ResultsFollower(results)
    try:
        with tqdm(total=len(tasks) * args.trials, desc='episodes', unit='ep',
                  file=sys.stderr) as progress:
            for task_id in tasks:
                run_task(args, task_id, policy, env, out, follower, progress, records)
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
