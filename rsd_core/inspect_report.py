"""The report of `rsd inspect`: what was found in each component of a checkpoint (tensors,
manifest facts, problems, warnings) and its readable text form. `rsd_core.inspect_checkpoint`
fills it; the `--json` form is `Report.to_dict`."""

from dataclasses import asdict, dataclass, field


@dataclass
class TensorInfo:
    """One tensor of a safetensors file: name, shape, dtype name ('float32'), all finite."""

    name: str
    shape: list[int]
    dtype: str
    finite: bool


@dataclass
class Component:
    """One checkpoint part: its files, tensors, manifest facts, and what is wrong with it."""

    name: str
    kind: str
    path: str
    format: str | None = None
    tensors: list[TensorInfo] = field(default_factory=list)
    parameters: int = 0
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What `inspect_path` found: the inspected path, its kind and its components."""

    path: str
    kind: str
    components: list[Component] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every component's problems, 'component: problem' (empty: usable)."""
        return [f'{c.name}: {p}' for c in self.components for p in c.problems]

    @property
    def warnings(self) -> list[str]:
        """Every component's warnings, 'component: warning'."""
        return [f'{c.name}: {w}' for c in self.components for w in c.warnings]

    def to_dict(self) -> dict:
        """The `--json` form: usable, problems, warnings and every component as a dict."""
        return {'path': self.path, 'kind': self.kind, 'usable': not self.problems,
                'problems': self.problems, 'warnings': self.warnings,
                'components': [asdict(c) for c in self.components]}


def format_report(report: Report, max_tensors: int | None = None) -> str:
    """Readable multi-line text of a report."""
    usable = not report.problems
    lines = [f'{report.kind} {report.path}: {"usable" if usable else "UNUSABLE"}']
    for component in report.components:
        lines.append(f'\n[{component.name}] {component.kind}'
                     + (f', format {component.format}' if component.format else '')
                     + (f', {len(component.tensors)} tensors, {component.parameters:,} values'
                        if component.tensors else ''))
        for key, value in component.facts.items():
            lines += fact_lines(key, value)
        shown = component.tensors
        if max_tensors is not None and component.kind == 'backbone':
            shown = shown[:max_tensors]
        width = max((len(t.name) for t in shown), default=0)
        for tensor in shown:
            lines.append(f'    {tensor.name:<{width}}  {str(tensor.shape):<16} {tensor.dtype}'
                         + ('' if tensor.finite else '  NON-FINITE'))
        if len(shown) < len(component.tensors):
            lines.append(f'    ... {len(component.tensors) - len(shown)} more (--all-tensors)')
    if report.warnings:
        lines.append('\nwarnings:')
        lines += [f'  - {w}' for w in report.warnings]
    if report.problems:
        lines.append('\nunusable because:')
        lines += [f'  - {p}' for p in report.problems]
    return '\n'.join(lines)


def fact_lines(key: str, value: object, indent: str = '  ') -> list[str]:
    """`key: value` lines; dicts one level deep get a line per item, metrics a summary."""
    if key == 'metrics' and isinstance(value, dict):
        return [f'{indent}{key}: {metrics_text(value)}']
    if isinstance(value, dict) and indent == '  ' and value:
        return [f'{indent}{key}:'] + [line for k, v in value.items()
                                      for line in fact_lines(k, v, indent + '  ')]
    return [f'{indent}{key}: {fact_text(value)}']


def metrics_text(metrics: dict) -> str:
    """Held-out acceptance figures of a distilled draft, when recorded."""
    held = metrics.get('held_out')
    if not isinstance(held, dict):
        return fact_text(metrics)
    return (f'held-out ({metrics.get("held_out_samples")} samples) token accuracy '
            f'{fact_text(held.get("token_accuracy"))}, exact-layer match '
            f'{fact_text(held.get("exact_match"))}, mean accepted layers '
            f'{fact_text(held.get("mean_accepted_layers"))}')


def fact_text(value: object) -> str:
    """A manifest value as short text: dicts as k=v, floats to 4 significant digits, float
    lists to 3 decimals."""
    if isinstance(value, dict):
        return ', '.join(f'{k}={fact_text(v)}' for k, v in value.items())
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return '[' + ', '.join(f'{v:.3f}' for v in value) + ']'
    return str(value)
