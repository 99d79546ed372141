"""The processes of `rsd eval-libero`: console scripts, a free ROS domain, child processes.

Pure plumbing, no ROS import: the policy and the bridges are separate processes that meet in a
private ROS domain (a free random ROS_DOMAIN_ID unless one is set; discovery kept on this
machine), each started in its own session with its output in a log file, and stopped with
SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL. Their own sessions keep a Ctrl-C
or a SIGTERM of the evaluation from reaching them directly: `terminate_as_interrupt` turns the
evaluation's SIGTERM and SIGHUP into the KeyboardInterrupt that stops them in order.
"""

from contextlib import contextmanager
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

logger = logging.getLogger(__name__)


class InfrastructureError(RuntimeError):
    """The evaluation could not run (as opposed to a policy failing its task)."""


@contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does (so a
    `kill` of the evaluation stops its children instead of orphaning them); the previous
    handlers come back afterwards. Main thread only."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
