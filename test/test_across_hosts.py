"""The stack across two hosts over DDS: the policy in one network namespace, a camera client in
another, joined only by a veth pair (10.77.x.1 <-> 10.77.x.2, a route for multicast so SPDP
discovery can go out). Each side also gets its own /dev/shm, so Fast DDS cannot fall back on
shared memory: discovery and every sample cross the link, as between two machines. The policy
is started from launch/policy.launch.xml exactly as on a robot workstation (launch_check), with
ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET (the README's multi-host setting) on both sides.

Skipped, saying why, where network namespaces cannot be made (no root, no `ip`, a sandbox that
forbids them).
"""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys

from launch_check import LaunchReader
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90.0


def ip(*args: str) -> None:
    subprocess.run(['ip', *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """(namespace of the policy host, namespace of the arm host), joined by a veth pair."""
    if shutil.which('ip') is None:
        pytest.skip('no `ip` command (iproute2): cannot make network namespaces here')
    tag = os.getpid() % 200 + 20
    hosts = [f'rsd{tag}a', f'rsd{tag}b']
    links = [f'rsdv{tag}a', f'rsdv{tag}b']
    try:
        ip('netns', 'add', hosts[0])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f'network namespaces are not permitted here: {exc.stderr.strip()}')
    try:
        ip('netns', 'add', hosts[1])
        ip('link', 'add', links[0], 'netns', hosts[0], 'type', 'veth', 'peer', 'name', links[1],
           'netns', hosts[1])
        for i, (host, link) in enumerate(zip(hosts, links, strict=True)):
            ip('-n', host, 'addr', 'add', f'10.77.{tag}.{i + 1}/24', 'dev', link)
            ip('-n', host, 'link', 'set', link, 'up')
            ip('-n', host, 'link', 'set', 'lo', 'up')
            ip('-n', host, 'route', 'add', '224.0.0.0/4', 'dev', link)
        yield hosts
    finally:
        for host in hosts:
            subprocess.run(['ip', 'netns', 'del', host], capture_output=True)


def on_host(host: str, command: list[str]) -> list[str]:
    """`command` inside network namespace `host`, with a /dev/shm of its own."""
    inner = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
    return ['ip', 'netns', 'exec', host, 'unshare', '--mount', 'sh', '-c', inner, 'sh',
            *command]


def test_a_policy_on_one_host_serves_an_arm_on_another(two_hosts, tiny_bundle, tmp_path):
    env = {**os.environ, 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_DOMAIN_ID': '42'}
    spec, = LaunchReader({'rsd_ros': ROOT}).read(
        ROOT / 'launch' / 'policy.launch.xml',
        {'model_dir': str(tiny_bundle), 'draft_dir': '', 'namespace': 'arm'})
    exe = str(Path(sys.executable).parent / spec.executable)
    log = open(tmp_path / 'policy.log', 'w')
    policy = subprocess.Popen(on_host(two_hosts[0], [exe, *spec.ros_args()]), env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        client = subprocess.run(
            on_host(two_hosts[1], [sys.executable, str(ROOT / 'test' / 'remote_camera.py'),
                                   '/arm', str(TIMEOUT)]),
            env=env, capture_output=True, text=True, timeout=TIMEOUT + 30)
        report = client.stdout.strip().splitlines()
        context = f'client: {client.stdout}{client.stderr[-2000:]}\npolicy: ' \
                  f'{(tmp_path / "policy.log").read_text()[-3000:]}'
        assert client.returncode == 0 and report, context
        result = json.loads(report[-1])
        assert result['chunk_for_sent_frame'] and result['policy_seen'], context
        assert (result['points'], result['positions']) == (8, 7), context
        assert policy.poll() is None, context
    finally:
        policy.send_signal(signal.SIGINT)
        try:
            policy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            policy.kill()
        log.close()
