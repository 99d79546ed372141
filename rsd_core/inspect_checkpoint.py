"""`rsd inspect PATH [--json] [--main DIR] [--strict]`: what a checkpoint holds and whether it
can be used.

PATH is a main bundle directory, a draft directory, a tokenizer directory, or one file
(.safetensors, or a component's .json manifest). The report lists the components, their tensors
(name, shape, dtype), whether a draft carries a trained input projection, hidden-size
compatibility with the main (--main, or the bundle the draft sits in), finiteness and recorded
provenance. A bundle's weight files are checked against the manifest's `files_sha256`, as the
loader checks them (`rsd_core.bundle.file_hash_problems`): a mismatch is unusable, a manifest
without hashes (older bundles) is reported unverified, a warning. Exit status 1 with the
reasons when anything is unusable (0 otherwise; with --strict, warnings such as an untrained
draft, a provenance mismatch or unverified weight files also fail).
"""

import argparse
from dataclasses import asdict
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
import torch

from rsd_core.bundle import FILE_HASHES, file_hash_problems
from rsd_core.checkpoint import CheckpointError, key_problems, load_manifest
from rsd_core.draft import FORMAT as DRAFT_FORMAT
from rsd_core.draft import (
    PROJECTION_KEYS,
    draft_kind,
    draft_problems,
    manifest_config,
    sniff_pickle,
)
from rsd_core.draft_v2 import FeatureDraft, FeatureDraftConfig
from rsd_core.inspect_report import Component, Report, TensorInfo, format_report

BUNDLE_FORMAT = 'rsd-main-bundle'
TOKENIZER_FORMAT = 'rsd-action-tokenizer'
HEADS_FORMAT = 'rsd-main-heads'
# Component directories: manifest file name -> (kind, expected format).
COMPONENTS = {'manifest.json': ('bundle', BUNDLE_FORMAT),
              'draft.json': ('draft', DRAFT_FORMAT),
              'action_tokenizer.json': ('tokenizer', TOKENIZER_FORMAT),
              'heads.json': ('heads', HEADS_FORMAT)}
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')


# ---------------------------------------------------------------- tensors and files

def scan_safetensors(path: Path, component: Component,
                     keep: bool = False) -> dict[str, torch.Tensor] | None:
    """Record every tensor of a safetensors file (name, shape, dtype, finiteness) in
    `component`, reading one tensor at a time. Returns the tensors when `keep` (else an empty
    dict), or None when the file cannot be read (the reason goes to component.problems)."""
    if not path.is_file():
        component.problems.append(f'{path.name} not found')
        return None
    kind = sniff_pickle(path)
    if kind:
        component.problems.append(f'{path.name} is not a safetensors file, it is a {kind} '
                                  '(pickled checkpoints are never loaded)')
        return None
    tensors = {}
    try:
        with safe_open(str(path), framework='pt', device='cpu') as reader:
            for name in reader.keys():
                value = reader.get_tensor(name)
                finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
                component.tensors.append(TensorInfo(
                    name, list(value.shape), str(value.dtype).removeprefix('torch.'), finite))
                component.parameters += value.numel()
                if keep:
                    tensors[name] = value
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        component.problems.append(f'{path.name} is not a readable safetensors file ({exc})')
        return None
    bad = [t.name for t in component.tensors if not t.finite]
    component.facts['finite'] = not bad
    if bad:
        component.problems.append(f'non-finite values (NaN/Inf) in {bad}')
    return tensors


def read_manifest(path: Path, expected: str, component: Component) -> dict | None:
    """The JSON manifest at `path` if its format is `expected`, recording format and version
    in `component`; None when it is missing, not JSON or of another format (the reason goes to
    component.problems)."""
    try:
        manifest = load_manifest(path, expected)
    except CheckpointError as exc:
        component.problems.append(str(exc).replace(f'{path}: ', f'{path.name}: '))
        return None
    component.format = manifest['format']
    component.facts['version'] = manifest.get('version')
    return manifest


def main_reference(main_dir: Path | None) -> tuple[dict | None, str | None]:
    """(hidden_size and weights_sha256 of a main bundle, or None; problem text if unreadable)."""
    if main_dir is None:
        return None, None
    try:
        manifest = load_manifest(main_dir / 'manifest.json', BUNDLE_FORMAT)
    except CheckpointError as exc:
        return None, f'--main: {exc}'
    return {'dir': str(main_dir), 'hidden_size': manifest.get('hidden_size'),
            'weights_sha256': manifest.get('weights_sha256')}, None


# ---------------------------------------------------------------- components

def inspect_draft(directory: Path, main: dict | None) -> Component:
    """A draft: tensors, trained projection, compatibility with the main, provenance."""
    weights = directory / 'draft.safetensors'
    component = Component('draft', 'draft', str(directory))
    if not weights.exists():
        pickles = sorted(p.name for p in directory.glob('*') if p.suffix in PICKLE_SUFFIXES)
        component.problems.append('draft.safetensors not found' + (
            f' (found {pickles}: pickled checkpoints are never loaded)' if pickles else ''))
        return component
    tensors = scan_safetensors(weights, component, keep=True)
    manifest = read_manifest(weights.with_suffix('.json'), DRAFT_FORMAT, component)
    if tensors is None:
        return component
    if manifest is not None and draft_kind(manifest) == 'v2':
        return inspect_v2_draft(component, tensors, manifest, main)
    proj = tensors.get('input_proj.weight')
    component.facts['input_projection'] = {
        'present': all(k in tensors for k in PROJECTION_KEYS),
        'shape': list(proj.shape) if proj is not None else None,
        'input_size': int(proj.shape[1]) if proj is not None and proj.dim() == 2 else None}
    if manifest is None:
        if any(k not in tensors for k in PROJECTION_KEYS):
            component.problems.append('input projection weights missing: '
                                      + ', '.join(k for k in PROJECTION_KEYS if k not in tensors))
        return component
    component.facts['draft_kind'] = draft_kind(manifest)
    provenance = manifest.get('provenance') if isinstance(manifest.get('provenance'), dict) \
        else {}
    trained = provenance.get('trained')
    component.facts['input_projection']['trained'] = trained is True \
        and component.facts['input_projection']['present']
    component.facts['provenance'] = provenance
    try:
        config = manifest_config(manifest, weights.with_suffix('.json'))
    except CheckpointError as exc:
        component.problems.append(str(exc))
        return component
    component.facts['config'] = asdict(config)
    hidden = main['hidden_size'] if main else None
    known = set(component.problems)
    component.problems += [p for p in draft_problems(tensors, config, hidden) if p not in known]
    if main:
        component.facts['main'] = main
        component.facts['hidden_size_compatible'] = \
            component.facts['input_projection']['input_size'] == hidden
        recorded = provenance.get('main_weights_sha256')
        component.facts['provenance_matches_main'] = recorded == main['weights_sha256']
        if recorded != main['weights_sha256']:
            component.warnings.append(f'distilled from main weights sha256 {recorded}, main '
                                      f'{main["dir"]} has {main["weights_sha256"]}')
    else:
        component.facts['hidden_size_compatible'] = None
        component.warnings.append('no main model to check hidden size and provenance against '
                                  '(pass --main DIR)')
    if trained is not True:
        component.warnings.append(f'manifest says the draft is not trained (trained={trained!r})')
    return component


def inspect_v2_draft(component: Component, tensors: dict[str, torch.Tensor], manifest: dict,
                     main: dict | None) -> Component:
    """A v2 draft: config, expected tensors, hidden size and weights hash of its main (it uses
    that main's head and embedding, so a mismatch is a problem, not a warning)."""
    component.facts['draft_kind'] = 'v2'
    provenance = manifest.get('provenance') if isinstance(manifest.get('provenance'), dict) \
        else {}
    component.facts['provenance'] = provenance
    where = Path(component.path) / 'draft.json'
    try:
        config = FeatureDraftConfig.from_dict(manifest.get('config'), where)
    except CheckpointError as exc:
        component.problems.append(str(exc))
        return component
    component.facts['config'] = asdict(config)
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k, v in FeatureDraft(config).state_dict().items()}
    component.problems += key_problems(tensors, shapes)
    recorded = provenance.get('main_weights_sha256')
    if main is None:
        component.facts['hidden_size_compatible'] = None
        component.warnings.append('no main model to check hidden size and provenance against '
                                  '(pass --main DIR); a v2 draft only runs with its main')
        return component
    component.facts['main'] = main
    component.facts['hidden_size_compatible'] = config.hidden_size == main['hidden_size']
    component.facts['provenance_matches_main'] = recorded == main['weights_sha256']
    if config.hidden_size != main['hidden_size']:
        component.problems.append(f'made for hidden size {config.hidden_size}, main '
                                  f'{main["dir"]} has {main["hidden_size"]}')
    if recorded != main['weights_sha256']:
        component.warnings.append(f'distilled from main weights sha256 {recorded}, main '
                                  f'{main["dir"]} has {main["weights_sha256"]} (a v2 draft '
                                  "uses its main's head: expect poor acceptance)")
    return component


def inspect_generic(directory: Path, name: str, kind: str, stem: str,
                    fmt: str) -> Component:
    """A tokenizer or heads component: manifest format, tensors, finiteness."""
    component = Component(name, kind, str(directory))
    tensors = scan_safetensors(directory / f'{stem}.safetensors', component)
    manifest = read_manifest(directory / f'{stem}.json', fmt, component)
    if manifest is not None:
        component.facts['manifest'] = {k: v for k, v in manifest.items()
                                       if not isinstance(v, (dict, list)) or k == 'config'}
    if tensors is not None and kind == 'tokenizer' and not component.problems:
        load_check(component, directory)
    return component


def load_check(component: Component, directory: Path) -> None:
    """Let the tokenizer module validate its own checkpoint, when that module is present."""
    try:
        from rsd_core.tokenizer import ActionTokenizer
    except ImportError:
        return
    try:
        ActionTokenizer.load(directory)
    except (CheckpointError, ValueError, KeyError, RuntimeError) as exc:
        component.problems.append(f'ActionTokenizer.load refuses it: {exc}')


def inspect_backbone(directory: Path) -> Component:
    """Backbone files: config, weights (safetensors only), tensors, finiteness."""
    component = Component('backbone', 'backbone', str(directory))
    if not directory.is_dir():
        component.problems.append('backbone directory not found')
        return component
    config_path = directory / 'config.json'
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            text = config.get('text_config', config)
            component.facts['architectures'] = config.get('architectures')
            component.facts['hidden_size'] = text.get('hidden_size')
            component.facts['num_hidden_layers'] = text.get('num_hidden_layers')
        except (json.JSONDecodeError, AttributeError) as exc:
            component.problems.append(f'config.json is not valid JSON ({exc})')
    else:
        component.problems.append('config.json not found')
    weights = sorted(directory.glob('*.safetensors'))
    pickles = sorted(p.name for p in directory.glob('*') if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        component.problems.append('no *.safetensors weights' + (
            f' (only pickled {pickles}, which are never loaded)' if pickles else ''))
    for path in weights:
        scan_safetensors(path, component)
    return component


def check_file_hashes(directory: Path, manifest: dict, component: Component) -> None:
    """Record in `component` whether the bundle's weight files match the manifest's hashes:
    each differing, missing or unlisted file is a problem (the loader refuses the bundle), no
    recorded hashes a warning (the loader warns and loads)."""
    problems = file_hash_problems(directory, manifest)
    if problems is None:
        component.facts[FILE_HASHES] = 'unverified: the manifest records no file hashes'
        component.warnings.append(f'weight files unverified: the manifest has no {FILE_HASHES} '
                                  '(an older bundle; the loader loads it with a warning)')
        return
    component.facts[FILE_HASHES] = (f'{len(manifest[FILE_HASHES])} weight files verified'
                                    if not problems else 'MISMATCH')
    component.problems += problems


def inspect_bundle(directory: Path, main_override: dict | None) -> list[Component]:
    """A main bundle: manifest, backbone, heads, action tokenizer, and its draft if present."""
    component = Component('bundle', 'bundle', str(directory))
    manifest = read_manifest(directory / 'manifest.json', BUNDLE_FORMAT, component)
    components = [component]
    main = None
    if manifest is not None:
        component.facts.update({k: manifest.get(k) for k in (
            'hidden_size', 'num_layers', 'codes_per_layer', 'levels', 'chunk_len', 'action_dim',
            'image_size', 'weights_sha256', 'provenance')})
        main = {'dir': str(directory), 'hidden_size': manifest.get('hidden_size'),
                'weights_sha256': manifest.get('weights_sha256')}
        check_file_hashes(directory, manifest, component)
    backbone = inspect_backbone(directory / 'backbone')
    components.append(backbone)
    if main and backbone.facts.get('hidden_size') not in (None, main['hidden_size']):
        backbone.problems.append(f'language model hidden size {backbone.facts["hidden_size"]}, '
                                 f'manifest says {main["hidden_size"]}')
    heads = inspect_generic(directory, 'heads', 'heads', 'heads', HEADS_FORMAT)
    if main:
        heads_hidden = heads.facts.get('manifest', {}).get('hidden_size')
        if heads_hidden not in (None, main['hidden_size']):
            heads.problems.append(f'heads built for hidden size {heads_hidden}, manifest says '
                                  f'{main["hidden_size"]}')
    components.append(heads)
    components.append(inspect_generic(directory / 'action_tokenizer', 'action_tokenizer',
                                      'tokenizer', 'action_tokenizer', TOKENIZER_FORMAT))
    if (directory / 'draft').is_dir():
        components.append(inspect_draft(directory / 'draft', main_override or main))
    else:
        component.facts['draft'] = None
    return components


def inspect_file(path: Path, main: dict | None) -> Report:
    """One file: a component's manifest or weights (that component is inspected), or anything
    else (read as safetensors when it claims to be, otherwise reported as unusable)."""
    kinds = {name.removesuffix('.json'): (kind, fmt) for name, (kind, fmt) in COMPONENTS.items()}
    kind, fmt = kinds.get(path.stem, (None, None)) if path.suffix in ('.json', '.safetensors') \
        else (None, None)
    if kind == 'bundle':
        return inspect_path(path.parent, main)
    if kind == 'draft':
        return draft_report(path.parent, main)
    if kind is not None:
        return Report(str(path), kind, [inspect_generic(path.parent, path.stem, kind, path.stem,
                                                        fmt)])
    component = Component(path.name, 'file', str(path))
    if path.suffix == '.safetensors' or sniff_pickle(path):
        scan_safetensors(path, component)
    else:
        component.problems.append(f'not a safetensors file or component manifest (suffix '
                                  f'{path.suffix!r}); expected a bundle, draft or tokenizer '
                                  'directory, a .safetensors file or its .json manifest')
    return Report(str(path), 'file', [component])


def draft_report(directory: Path, main: dict | None) -> Report:
    """A draft directory, checked against `main` or else the bundle it sits in (if any)."""
    if main is None and (directory.parent / 'manifest.json').is_file():
        main, _ = main_reference(directory.parent)
    return Report(str(directory), 'draft', [inspect_draft(directory, main)])


def directory_kind(path: Path) -> str | None:
    """'bundle', 'draft', 'tokenizer' or 'heads' from the files a directory holds."""
    for manifest_name, (kind, _) in COMPONENTS.items():
        stem = manifest_name.removesuffix('.json')
        if (path / manifest_name).is_file() or (
                kind != 'bundle' and (path / f'{stem}.safetensors').exists()):
            return kind
    if (path / 'backbone').is_dir():
        return 'bundle'
    if any(p.stem == 'draft' for p in path.glob('*')):
        return 'draft'
    return None


def inspect_path(path: str | Path, main: dict | None = None) -> Report:
    """Inspect a bundle, draft or tokenizer directory, or one file."""
    path = Path(path)
    if not path.exists():
        return Report(str(path), 'missing', [
            Component(path.name, 'missing', str(path), problems=['path not found'])])
    if path.is_file():
        return inspect_file(path, main)
    kind = directory_kind(path)
    if kind is None:
        return Report(str(path), 'unknown', [Component(path.name, 'unknown', str(path), problems=[
            f'not a bundle, draft or tokenizer directory (none of {sorted(COMPONENTS)} found)'])])
    if kind == 'bundle':
        return Report(str(path), kind, inspect_bundle(path, main))
    if kind == 'draft':
        return draft_report(path, main)
    stem = 'action_tokenizer' if kind == 'tokenizer' else 'heads'
    return Report(str(path), kind, [inspect_generic(path, stem, kind, stem,
                                                    COMPONENTS[f'{stem}.json'][1])])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd inspect` options."""
    parser.add_argument('path', help='bundle, draft or tokenizer directory, or one file')
    parser.add_argument('--main', default=None,
                        help='main bundle to check a draft against (hidden size, provenance)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    parser.add_argument('--strict', action='store_true',
                        help='also fail on warnings (untrained draft, provenance mismatch, '
                             'weight files without recorded hashes)')
    parser.add_argument('--all-tensors', action='store_true',
                        help='list every backbone tensor (default: the first 20)')


def run(args: argparse.Namespace) -> int:
    """`rsd inspect`: print the report; exit 1 if unusable (or, with --strict, warned)."""
    main, problem = main_reference(Path(args.main) if args.main else None)
    report = inspect_path(args.path, main)
    if problem:
        report.components.insert(0, Component('main', 'bundle', args.main, problems=[problem]))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report, None if args.all_tensors else 20))
    failed = report.problems or (args.strict and report.warnings)
    return 1 if failed else 0
