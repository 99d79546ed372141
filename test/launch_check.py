"""Read the project's XML launch files the way `ros2 launch` does, for machines without it.

Covers exactly the subset the project uses (`arg`, `include`, `node` with `param` and `remap`;
substitutions `$(var)`, `$(find-pkg-share)`, `$(env)`) and raises on anything else, so a launch
file that strays outside what this checker understands fails the test instead of passing
unchecked. Parameter values are coerced with YAML rules, as launch_ros does.
"""

from dataclasses import dataclass, field
import os
from pathlib import Path
import re
import xml.etree.ElementTree as ET

import yaml

SUBSTITUTION = re.compile(r'\$\(([a-z-]+)((?:\s+[^)\s]+)*)\)')


class LaunchError(ValueError):
    """The launch file names something that does not exist or is not understood."""


@dataclass
class NodeSpec:
    pkg: str
    executable: str
    name: str
    namespace: str
    param_files: list[Path] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)
    remaps: list[tuple[str, str]] = field(default_factory=list)
    source: str = ''

    def ros_args(self) -> list[str]:
        """Command-line arguments equivalent to what launch_ros passes to the process."""
        args = ['--ros-args', '-r', f'__node:={self.name}']
        if self.namespace:
            args += ['-r', f'__ns:=/{self.namespace.strip("/")}']
        for path in self.param_files:
            args += ['--params-file', str(path)]
        for key, value in self.params.items():
            args += ['-p', f'{key}:={yaml.safe_dump(value, default_flow_style=True).strip()}'
                     .replace('\n...', '')]
        for source, target in self.remaps:
            args += ['-r', f'{source}:={target}']
        return args

    def file_params(self) -> dict[str, object]:
        """Parameters the YAML files give this node (by node name or the '/**' wildcard)."""
        merged: dict[str, object] = {}
        for path in self.param_files:
            content = yaml.safe_load(path.read_text()) or {}
            for key in (self.name, f'/{self.name}', '/**'):
                merged.update(content.get(key, {}).get('ros__parameters', {}))
        return merged


def coerce(value: str, where: str) -> object:
    """launch_ros' rule: a parameter value string is read as YAML (empty stays a string); a
    list must be non-empty with items of one type, as launch_ros refuses anything else."""
    result = '' if value == '' else yaml.safe_load(value)
    if isinstance(result, list) and (not result or len({type(v) for v in result}) > 1
                                     or type(result[0]) not in (bool, int, float, str)):
        raise LaunchError(f'{where}: parameter value {value!r}: launch_ros takes only a '
                          'non-empty list of one type (bool, int, float or str)')
    return result


class LaunchReader:
    """Expand a launch file into the nodes it starts."""

    def __init__(self, package_shares: dict[str, Path]) -> None:
        self.package_shares = package_shares

    def read(self, path: Path, arguments: dict[str, str] | None = None) -> list[NodeSpec]:
        return self._read(Path(path), dict(arguments or {}))

    def _read(self, path: Path, context: dict[str, str]) -> list[NodeSpec]:
        if not path.is_file():
            raise LaunchError(f'launch file not found: {path}')
        root = ET.parse(path).getroot()
        if root.tag != 'launch':
            raise LaunchError(f'{path}: root element is <{root.tag}>, expected <launch>')
        nodes = []
        for element in root:
            where = f'{path.name}:<{element.tag} {element.attrib}>'
            if element.tag == 'arg':
                self._check_attributes(element, {'name', 'default', 'description'}, where)
                name = element.attrib.get('name')
                if not name:
                    raise LaunchError(f'{where}: <arg> without a name')
                if name not in context:
                    if 'default' not in element.attrib:
                        raise LaunchError(f'{where}: argument {name!r} has no value')
                    context[name] = self.substitute(element.attrib['default'], context, where)
            elif element.tag == 'include':
                self._check_attributes(element, {'file'}, where)
                scoped = dict(context)
                for arg in element:
                    if arg.tag != 'arg':
                        raise LaunchError(f'{where}: unexpected <{arg.tag}> in <include>')
                    scoped[arg.attrib['name']] = self.substitute(arg.attrib['value'], context,
                                                                 where)
                included = Path(self.substitute(element.attrib['file'], context, where))
                nodes += self._read(included, scoped)
            elif element.tag == 'node':
                nodes.append(self._node(element, context, where))
            else:
                raise LaunchError(f'{where}: element not understood by the checker')
        return nodes

    def _node(self, element: ET.Element, context: dict[str, str], where: str) -> NodeSpec:
        self._check_attributes(element, {'pkg', 'exec', 'name', 'namespace', 'output'}, where)
        attrs = {k: self.substitute(v, context, where) for k, v in element.attrib.items()}
        node = NodeSpec(pkg=attrs['pkg'], executable=attrs['exec'], name=attrs['name'],
                        namespace=attrs.get('namespace', ''), source=where)
        for child in element:
            if child.tag == 'param' and 'from' in child.attrib:
                self._check_attributes(child, {'from'}, where)
                param_file = Path(self.substitute(child.attrib['from'], context, where))
                if not param_file.is_file():
                    raise LaunchError(f'{where}: parameter file not found: {param_file}')
                node.param_files.append(param_file)
            elif child.tag == 'param':
                self._check_attributes(child, {'name', 'value'}, where)
                value = self.substitute(child.attrib['value'], context, where)
                node.params[child.attrib['name']] = coerce(value, where)
            elif child.tag == 'remap':
                self._check_attributes(child, {'from', 'to'}, where)
                node.remaps.append((self.substitute(child.attrib['from'], context, where),
                                    self.substitute(child.attrib['to'], context, where)))
            else:
                raise LaunchError(f'{where}: <{child.tag}> not understood by the checker')
        return node

    def substitute(self, text: str, context: dict[str, str], where: str) -> str:
        def replace(match: re.Match) -> str:
            kind, args = match.group(1), match.group(2).split()
            if kind == 'var':
                if args[0] not in context:
                    raise LaunchError(f'{where}: $(var {args[0]}) names no declared argument')
                return context[args[0]]
            if kind == 'find-pkg-share':
                if args[0] not in self.package_shares:
                    raise LaunchError(f'{where}: package {args[0]!r} not found')
                return str(self.package_shares[args[0]])
            if kind == 'env':
                return os.environ.get(args[0], args[1] if len(args) > 1 else '')
            raise LaunchError(f'{where}: substitution $({kind}) not understood by the checker')

        return SUBSTITUTION.sub(replace, text)

    @staticmethod
    def _check_attributes(element: ET.Element, allowed: set[str], where: str) -> None:
        unknown = set(element.attrib) - allowed
        if unknown:
            raise LaunchError(f'{where}: attributes {sorted(unknown)} not understood')
