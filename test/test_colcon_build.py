"""A ROS 2 workstation builds the package with colcon: real build, installed layout checked."""

import os
from pathlib import Path
import shutil
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    listing = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                             cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if (ROOT / line).is_file()]


def test_colcon_build_installs_executables_launch_and_config(tmp_path):
    source = tmp_path / 'src' / 'rsd_ros'
    for name in tracked_files():
        if name.startswith(('models/', 'data/')):
            continue
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    colcon = Path(sys.executable).parent / 'colcon'
    build = subprocess.run([str(colcon), 'build', '--packages-select', 'rsd_ros'], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr

    install = tmp_path / 'install' / 'rsd_ros'
    share = install / 'share' / 'rsd_ros'
    for executable in ('rsd', 'rsd_policy', 'libero_bridge', 'libero_expert'):
        assert os.access(install / 'lib' / 'rsd_ros' / executable, os.X_OK), executable
    index = install / 'share' / 'ament_index' / 'resource_index' / 'packages'
    assert (index / 'rsd_ros').is_file()
    assert {p.name for p in (share / 'launch').iterdir()} == {
        p.name for p in (ROOT / 'launch').glob('*.launch.xml')}
    assert {p.name for p in (share / 'config').iterdir()} == {
        p.name for p in (ROOT / 'config').glob('*.*') if p.suffix in {'.yaml', '.xml'}}
    assert (share / 'package.xml').is_file()

    site = next((install / 'lib').glob('python3*/site-packages'))
    env = dict(os.environ, PYTHONPATH=str(site), AMENT_PREFIX_PATH=str(install))
    run = subprocess.run([str(install / 'lib' / 'rsd_ros' / 'rsd'), '--help'], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and 'eval-libero' in run.stdout, run.stdout + run.stderr
    where = subprocess.run([sys.executable, '-c', 'import rsd_core; print(rsd_core.__file__)'],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
