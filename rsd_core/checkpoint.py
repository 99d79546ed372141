"""Safetensors + JSON manifest files: the only checkpoint format the project reads or writes.

A component lives in a directory as `<name>.safetensors` (tensors) beside `<name>.json`
(manifest: format tag, version, shapes and provenance). Nothing is ever unpickled.
"""

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what reads it."""


def save_component(directory: str | Path, name: str, tensors: dict[str, torch.Tensor],
                   manifest: dict) -> Path:
    """Write `<name>.safetensors` and `<name>.json` into `directory`; return the weights path.
    Both get the umask's permissions (safetensors creates its files owner-only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f'{name}.safetensors'
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
    weights.chmod(0o666 & ~current_umask())
    write_manifest(directory / f'{name}.json', dict(manifest, weights_sha256=file_sha256(weights)))
    return weights


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write a JSON manifest (sorted keys, indented) atomically: readers see the old or the new
    file, never a part."""
    path = Path(path)
    partial = path.with_name(f'.{path.name}.partial')
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + '\n')
    os.replace(partial, path)


def load_manifest(path: str | Path, expected_format: str) -> dict:
    """Read a JSON manifest and check its `format` tag."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: manifest not found')
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f'{path}: manifest is not valid JSON ({exc})') from exc
    if not isinstance(manifest, dict) or manifest.get('format') != expected_format:
        found = manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f'{path}: expected format {expected_format!r}, found {found!r}')
    return manifest


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU, refusing anything else with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: weights file not found')
    if path.suffix != '.safetensors':
        raise CheckpointError(f'{path}: not a .safetensors file (pickled checkpoints are '
                              'never loaded)')
    try:
        return load_file(str(path), device='cpu')
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f'{path}: not a readable safetensors file ({exc})') from exc


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors that hold NaN or Inf."""
    return sorted(k for k, v in tensors.items()
                  if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def key_problems(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 note: str = '') -> list[str]:
    """Messages naming the keys of `tensors` missing from, unexpected in, or mis-shaped against
    the expected `shapes`; `note` is appended to each shape message (e.g. the config)."""
    problems = []
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing:
        problems.append(f'missing keys {missing}')
    if unexpected:
        problems.append(f'unexpected keys {unexpected}')
    for key in sorted(set(shapes) & set(tensors)):
        found = tuple(tensors[key].shape)
        if found != tuple(shapes[key]):
            problems.append(f'{key}: shape {list(found)}, expected {list(shapes[key])}{note}')
    return problems


def check_state_dict(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected, mis-shaped or non-finite key."""
    problems = key_problems(tensors, {k: tuple(v.shape) for k, v in expected.items()})
    bad = non_finite_keys({k: v for k, v in tensors.items() if k in expected})
    if bad:
        problems.append(f'non-finite values in {bad}')
    if problems:
        raise CheckpointError(f'{where}: ' + '; '.join(problems))


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, dtypes, shapes and bytes, independent of file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f'{key}:{value.dtype}:{list(value.shape)}'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
