"""Model bundles: the layout, the default location, and reading a bundle's manifest.

A bundle is one directory (docs/ARCHITECTURE.md, "Bundle layout"):

    manifest.json       format 'rsd-main-bundle': sizes, action names, prompt, weights hash
    backbone/           transformers LLaVA save_pretrained + word-level text tokenizer
    heads.safetensors   RFSQ head + layer embedding (+ heads.json)
    action_tokenizer/   the RFSQ action tokenizer with its normalisation statistics
    draft/              optional default draft

This module only reads (the engine imports it); building and writing bundles, and the presets,
are `rsd_core.bundle_build`; `rsd build-default` is `rsd_core.training.build_default`.
"""

import logging
import os
from pathlib import Path

from rsd_core.checkpoint import (
    CheckpointError,
    file_sha256,
    load_manifest,
    load_tensors,
    tensors_sha256,
)

BUNDLE_FORMAT = 'rsd-main-bundle'
BUNDLE_VERSION = 1
MANIFEST = 'manifest.json'
DEFAULT_ACTION_NAMES = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'rsd_ros'
# manifest.json keys every reader relies on, with their JSON types.
REQUIRED_KEYS = {'hidden_size': int, 'num_layers': int, 'codes_per_layer': int, 'levels': int,
                 'chunk_len': int, 'action_dim': int, 'image_size': int, 'action_names': list,
                 'control_period_s': (int, float), 'prompt_template': str,
                 'weights_sha256': str, 'provenance': dict}


def default_bundle_dir() -> Path:
    """$RSD_MODEL_DIR, else <share>/rsd_ros/models/default of a colcon install when present,
    else <repo>/models/default."""
    env = os.environ.get('RSD_MODEL_DIR')
    if env:
        return Path(env).expanduser()
    share = _installed_share_dir()
    if share is not None and (share / 'models' / 'default' / MANIFEST).is_file():
        return share / 'models' / 'default'
    return REPO_ROOT / 'models' / 'default'


def _installed_share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory
    except ImportError:
        return None
    try:
        return Path(get_package_share_directory(PACKAGE))
    except (LookupError, OSError, ValueError):
        return None


def load_bundle_manifest(bundle_dir: str | Path) -> dict:
    """Read and validate `<bundle>/manifest.json` (CheckpointError naming what is wrong)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise CheckpointError(f'{bundle_dir}: bundle directory not found (build the default '
                              'one with `rsd build-default`)')
    path = bundle_dir / MANIFEST
    manifest = load_manifest(path, BUNDLE_FORMAT)
    if manifest.get('version') != BUNDLE_VERSION:
        raise CheckpointError(f'{path}: version {manifest.get("version")!r}, this code reads '
                              f'version {BUNDLE_VERSION}')
    problems = [f'{key} missing' if key not in manifest else
                f'{key} is {type(manifest[key]).__name__}'
                for key, kind in REQUIRED_KEYS.items()
                if key not in manifest or not isinstance(manifest[key], kind)
                or isinstance(manifest[key], bool)]
    if not problems and len(manifest['action_names']) != manifest['action_dim']:
        problems.append(f'{len(manifest["action_names"])} action_names for action_dim '
                        f'{manifest["action_dim"]}')
    if problems:
        raise CheckpointError(f'{path}: ' + '; '.join(problems))
    return manifest


def bundle_problems(bundle_dir: str | Path) -> list[str]:
    """What keeps `bundle_dir` from being a complete bundle (cheap: no weights are read)."""
    bundle_dir = Path(bundle_dir)
    try:
        load_bundle_manifest(bundle_dir)
    except CheckpointError as exc:
        return [str(exc)]
    files = ['backbone/config.json', 'backbone/tokenizer.json', 'backbone/tokenizer_config.json',
             'heads.safetensors', 'heads.json', 'action_tokenizer/action_tokenizer.safetensors',
             'action_tokenizer/action_tokenizer.json']
    problems = [f'{bundle_dir / f}: missing' for f in files if not (bundle_dir / f).is_file()]
    if not any((bundle_dir / 'backbone').glob('*.safetensors')):
        problems.append(f'{bundle_dir}/backbone: no *.safetensors weights')
    return problems


FILE_HASHES = 'files_sha256'       # manifest key: {relative path: sha256 of the file's bytes}
logger = logging.getLogger(__name__)


def weight_files(bundle_dir: str | Path) -> list[Path]:
    """Every weight file of a bundle, the draft's excepted (it carries its own hash): the
    backbone's safetensors, the heads and the action tokenizer."""
    bundle_dir = Path(bundle_dir)
    return sorted([*(bundle_dir / 'backbone').glob('*.safetensors'),
                   bundle_dir / 'heads.safetensors',
                   bundle_dir / 'action_tokenizer' / 'action_tokenizer.safetensors'])


def file_hashes(bundle_dir: str | Path) -> dict[str, str]:
    """{path relative to the bundle: sha256} of those `weight_files` that exist (~0.2 s for
    50 MB)."""
    bundle_dir = Path(bundle_dir)
    return {path.relative_to(bundle_dir).as_posix(): file_sha256(path)
            for path in weight_files(bundle_dir) if path.is_file()}


def file_hash_problems(bundle_dir: str | Path, manifest: dict) -> list[str] | None:
    """Every weight file whose bytes differ from the manifest's `files_sha256` (actual and
    expected hash, first 12 hex digits), that is missing, or that the manifest does not list;
    None when the manifest records no hashes (written before they were recorded)."""
    bundle_dir = Path(bundle_dir)
    recorded = manifest.get(FILE_HASHES)
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or not all(
            isinstance(v, str) for v in recorded.values()):
        return [f'{FILE_HASHES} is not an object of {{relative path: sha256 hex}}']
    actual = file_hashes(bundle_dir)
    problems = [f'{name}: sha256 {actual[name][:12]}, manifest expects {digest[:12]}'
                for name, digest in sorted(recorded.items())
                if name in actual and actual[name] != digest]
    problems += [f'{name}: listed in the manifest but missing' for name in sorted(recorded)
                 if name not in actual]
    problems += [f'{name}: a weight file the manifest does not list' for name in sorted(actual)
                 if name not in recorded]
    return problems


def verify_file_hashes(bundle_dir: str | Path, manifest: dict) -> None:
    """CheckpointError naming every weight file of `file_hash_problems` (a flipped bit never
    drives the arm). A manifest without hashes is loaded with a warning."""
    problems = file_hash_problems(bundle_dir, manifest)
    if problems is None:
        logger.warning('%s: the manifest records no file hashes, so the weights are not '
                       'checked against corruption; rebuild or re-save the bundle', bundle_dir)
    elif problems:
        raise CheckpointError(f'{bundle_dir}: weight files do not match the manifest '
                              f'({FILE_HASHES}): ' + '; '.join(problems))


def bundle_weights_sha256(bundle_dir: str | Path) -> str:
    """Hash of the backbone and heads tensors as stored (what the manifest records)."""
    bundle_dir = Path(bundle_dir)
    tensors = {}
    for path in sorted((bundle_dir / 'backbone').glob('*.safetensors')):
        tensors.update({f'backbone.{k}': v for k, v in load_tensors(path).items()})
    tensors.update({f'heads.{k}': v
                    for k, v in load_tensors(bundle_dir / 'heads.safetensors').items()})
    return tensors_sha256(tensors)
