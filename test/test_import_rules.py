"""The package import rules of docs/ARCHITECTURE.md, enforced by reading every import.

Every `import` / `from ... import` statement is read with ast, at any level (function-level
imports count), and so are module names passed as strings to importlib (a command table).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('rsd_core', 'rsd_ros', 'sim_bridge')
STDLIB_OK = {'__future__', 'collections', 'dataclasses', 'typing'}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob('*.py')}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any level, plus dotted string literals naming a module
    of this project (how a command table loads its modules; the ament package name 'rsd_ros'
    alone is not a module path)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    package = module_name(path).rsplit('.', 1)[0] if path.name != '__init__.py' \
        else module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f'{base}.{alias.name}' for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                '.' in node.value and node.value.split('.')[0] in PACKAGES and \
                node.value.replace('.', '').replace('_', '').isalnum():
            found.add(node.value)            # a dotted module path handed to importlib
    return found


def project_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (names that are modules, not attributes)."""
    return {name for name in imports(path) if name in known}


KNOWN = modules()


def top(name: str) -> str:
    return name.split('.')[0]


NOT_IN_THE_CORE = ('rclpy', 'rsd_ros', 'sim_bridge', 'libero', 'robosuite', 'mujoco',
                   'cv_bridge', 'builtin_interfaces')


@pytest.mark.parametrize('name', sorted(n for n in KNOWN if top(n) == 'rsd_core'))
def test_the_core_knows_no_ros_and_no_simulator(name):
    bad = {i for i in imports(KNOWN[name])
           if top(i) in NOT_IN_THE_CORE or top(i).endswith('_msgs')}
    assert not bad, f'{name} imports {sorted(bad)}'


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += project_imports(KNOWN[name], KNOWN)
    return seen


def test_the_engine_reaches_no_training_module():
    reached = closure('rsd_core.engine')
    training = sorted(n for n in reached if n.startswith('rsd_core.training'))
    assert not training, f'rsd_core.engine reaches {training}'


@pytest.mark.parametrize('name', sorted(n for n in KNOWN if top(n) == 'sim_bridge'))
def test_the_simulator_reaches_the_policy_only_through_topics(name):
    allowed = {'rsd_ros', 'rsd_ros.topics', 'rsd_core', 'rsd_core.observations'}
    bad = {i for i in project_imports(KNOWN[name], KNOWN)
           if top(i) in ('rsd_core', 'rsd_ros') and i not in allowed}
    assert not bad, f'{name} imports {sorted(bad)}; sim_bridge may use rsd_ros.topics ' \
                    '(the topic contract) and rsd_core.observations (a file format) only'


def test_the_topic_contract_imports_only_messages_and_rclpy():
    for name in imports(KNOWN['rsd_ros.topics']):
        root = top(name)
        assert root in STDLIB_OK | {'rclpy', 'builtin_interfaces'} or root.endswith('_msgs'), \
            f'rsd_ros.topics imports {name}'


@pytest.mark.parametrize('package', PACKAGES)
def test_no_import_cycles(package):
    graph = {n: {i for i in project_imports(KNOWN[n], KNOWN) if i != n}
             for n in KNOWN if top(n) == package}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in graph.get(name, ()):
            if state.get(nxt) == 1:
                raise AssertionError(' -> '.join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
