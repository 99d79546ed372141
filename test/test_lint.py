"""Style and layering checks that run with the suite."""

import ast
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split('.')[0])
    return roots


def test_engine_imports_neither_ros_nor_libero():
    forbidden = {'rclpy', 'libero', 'robosuite', 'mujoco', 'sensor_msgs', 'std_msgs',
                 'trajectory_msgs', 'diagnostic_msgs', 'cv_bridge', 'rsd_ros', 'sim_bridge'}
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & forbidden)
                 for p in (ROOT / 'rsd_core').rglob('*.py')}
    assert not {k: v for k, v in offenders.items() if v}


def test_sim_bridge_reaches_policy_only_through_topics():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & {'rsd_ros'})
                 for p in (ROOT / 'sim_bridge').rglob('*.py')}
    assert not {k: v for k, v in offenders.items() if v}
