"""Model bundles: layout, default location, and `rsd build-default`.

A bundle is one directory (docs/ARCHITECTURE.md, "Bundle layout"):

    manifest.json       format 'rsd-main-bundle': sizes, action names, prompt, weights hash
    backbone/           transformers LLaVA save_pretrained + word-level text tokenizer
    heads.safetensors   RFSQ head + layer embedding (+ heads.json)
    action_tokenizer/   the RFSQ action tokenizer with its normalisation statistics
    draft/              optional default draft

The built-in default is a small randomly initialised LLaVA (CLIP-shaped vision tower, Llama
language model) so the whole stack runs on a CPU; its shapes are those of an OpenVLA-style
checkpoint, which loads through the same code.
"""

import argparse
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
import json
import logging
import os
from pathlib import Path
import shutil
import tempfile
import time
from typing import TYPE_CHECKING

import torch

from rsd_core.checkpoint import CheckpointError, load_manifest, load_tensors, tensors_sha256
from rsd_core.tokenizer import ActionTokenizer

if TYPE_CHECKING:  # imported lazily at run time: main_model imports this module
    from transformers import LlavaConfig, PreTrainedTokenizerBase

    from rsd_core.main_model import MainModel

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 'rsd-main-bundle'
BUNDLE_VERSION = 1
MANIFEST = 'manifest.json'
DEFAULT_ACTION_NAMES = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
REPO_ROOT = Path(__file__).resolve().parents[1]
# provenance['weights'] of a bundle built untrained; anything else holds weights worth keeping.
RANDOM_WEIGHTS = 'random initialisation'
PACKAGE = 'rsd_ros'
# manifest.json keys every reader relies on, with their JSON types.
REQUIRED_KEYS = {'hidden_size': int, 'num_layers': int, 'codes_per_layer': int, 'levels': int,
                 'chunk_len': int, 'action_dim': int, 'image_size': int, 'action_names': list,
                 'control_period_s': (int, float), 'prompt_template': str,
                 'weights_sha256': str, 'provenance': dict}


@dataclass(frozen=True)
class BackbonePreset:
    """Sizes of a built-in LLaVA: CLIP vision tower + projector + Llama language model."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int

    @property
    def num_image_tokens(self) -> int:
        """Vision patches per image, (image_size // patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # 64 image tokens; 15.6 M parameters (62 MB in float32 with the heads).
    'default': BackbonePreset(image_size=224, patch_size=28, vision_hidden=256, vision_layers=4,
                              vision_heads=4, vision_ffn=1024, text_hidden=384, text_layers=6,
                              text_heads=6, text_ffn=1024),
    # The trained default policy: 128 px camera frames as the bridge sends them, 64 image
    # tokens; 6.1 M parameters (24 MB in float32 with the heads).
    'small': BackbonePreset(image_size=128, patch_size=16, vision_hidden=192, vision_layers=4,
                            vision_heads=3, vision_ffn=768, text_hidden=256, text_layers=4,
                            text_heads=4, text_ffn=768),
    # For tests: 16 image tokens, 0.46 M parameters (2 MB with the heads).
    'tiny': BackbonePreset(image_size=112, patch_size=28, vision_hidden=64, vision_layers=2,
                           vision_heads=2, vision_ffn=128, text_hidden=64, text_layers=2,
                           text_heads=2, text_ffn=128),
}


# ---------------------------------------------------------------- locations and manifests

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


def bundle_weights_sha256(bundle_dir: str | Path) -> str:
    """Hash of the backbone and heads tensors as stored (what the manifest records)."""
    bundle_dir = Path(bundle_dir)
    tensors = {}
    for path in sorted((bundle_dir / 'backbone').glob('*.safetensors')):
        tensors.update({f'backbone.{k}': v for k, v in load_tensors(path).items()})
    tensors.update({f'heads.{k}': v
                    for k, v in load_tensors(bundle_dir / 'heads.safetensors').items()})
    return tensors_sha256(tensors)


# ---------------------------------------------------------------- building

def llava_config(preset: BackbonePreset,
                 text_tokenizer: 'PreTrainedTokenizerBase') -> 'LlavaConfig':
    """The transformers LlavaConfig of a preset, sized to the text tokenizer's vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = text_tokenizer.get_vocab()
    vision = CLIPVisionConfig(hidden_size=preset.vision_hidden,
                              intermediate_size=preset.vision_ffn,
                              num_hidden_layers=preset.vision_layers,
                              num_attention_heads=preset.vision_heads,
                              image_size=preset.image_size, patch_size=preset.patch_size)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=preset.text_hidden,
                       intermediate_size=preset.text_ffn, num_hidden_layers=preset.text_layers,
                       num_attention_heads=preset.text_heads,
                       num_key_value_heads=preset.text_heads, max_position_embeddings=512,
                       pad_token_id=vocab['<pad>'], bos_token_id=vocab['<s>'],
                       eos_token_id=vocab['</s>'], tie_word_embeddings=True)
    # 'default' drops the CLS token: exactly (image_size / patch_size)^2 image tokens. The LM
    # head is never used (the RFSQ head reads the hidden states), so it is tied to the input
    # embedding instead of stored.
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab['<image>'],
                       image_seq_length=preset.num_image_tokens,
                       vision_feature_select_strategy='default', vision_feature_layer=-1,
                       tie_word_embeddings=True)


def new_main_model(preset: str = 'default', seed: int = 0, num_layers: int = 8,
                   codes_per_layer: int = 128, levels: int = 7,
                   proprio_names: tuple[str, ...] = ()) -> 'MainModel':
    """A randomly initialised MainModel of a preset (float32, CPU, eval mode), with a
    proprioception input of `proprio_names` if any; the global torch RNG is left untouched."""
    from transformers import LlavaForConditionalGeneration

    from rsd_core.main_model import MainModel
    from rsd_core.processor import PromptProcessor, build_text_tokenizer

    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
    sizes = PRESETS[preset]
    text_tokenizer = build_text_tokenizer()
    config = llava_config(sizes, text_tokenizer)
    processor = PromptProcessor(text_tokenizer, sizes.image_size, sizes.num_image_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = LlavaForConditionalGeneration(config)
        return MainModel(backbone, processor, num_layers, codes_per_layer, levels,
                         proprio_names=tuple(proprio_names)).eval()


def write_bundle(model: 'MainModel', tokenizer: ActionTokenizer, out_dir: str | Path,
                 action_names: tuple[str, ...] | list[str], control_period: float,
                 provenance: dict) -> str:
    """Write a MainModel and its fitted ActionTokenizer as a complete bundle (no draft) into
    out_dir: backbone/, heads, action_tokenizer/, then manifest.json last.

    An older bundle's manifest, backbone/ and draft/ are removed first (a stale draft would not
    match the new weights). control_period in seconds. provenance: recorded in the manifest
    (after 'created' and the library versions, which it may override). Returns the weights
    sha256.
    """
    import transformers

    from rsd_core.main_model import quiet_transformers

    out_dir = Path(out_dir)
    cfg = tokenizer.config
    if len(action_names) != cfg.action_dim:
        raise ValueError(f'{len(action_names)} action names for {cfg.action_dim} action dims')
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out_dir / 'draft', ignore_errors=True)
    shutil.rmtree(out_dir / 'backbone', ignore_errors=True)
    with quiet_transformers():
        model.backbone.save_pretrained(str(out_dir / 'backbone'))
    model.processor.tokenizer.save_pretrained(str(out_dir / 'backbone'))
    model.save_heads(out_dir)
    tokenizer.save(out_dir / 'action_tokenizer')
    weights = bundle_weights_sha256(out_dir)
    manifest = {
        'format': BUNDLE_FORMAT, 'version': BUNDLE_VERSION,
        'hidden_size': model.hidden_size, 'num_layers': model.num_layers,
        'codes_per_layer': model.codes_per_layer, 'levels': model.levels,
        'chunk_len': cfg.chunk_len, 'action_dim': cfg.action_dim,
        'action_names': list(action_names), 'control_period_s': float(control_period),
        'image_size': model.processor.image_size,
        'num_image_tokens': model.processor.num_image_tokens,
        'prompt_template': model.processor.prompt_template,
        'weights_sha256': weights,
        'provenance': {'created': datetime.now(UTC).isoformat(timespec='seconds'),
                       'transformers_version': transformers.__version__,
                       'torch_version': torch.__version__, **provenance},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + '\n')
    return weights


def build_main_bundle(out_dir: str | Path, preset: str, tokenizer: ActionTokenizer, seed: int = 0,
                      action_names: tuple[str, ...] | list[str] = DEFAULT_ACTION_NAMES,
                      control_period: float = 0.05, provenance: dict | None = None,
                      proprio_names: tuple[str, ...] = ()) -> Path:
    """Write a complete main bundle (no draft) of a new randomly initialised preset model into
    out_dir, which must be new or empty.

    tokenizer: a fitted ActionTokenizer; its config sets L, C = chunk_len * latent_dim and V.
    control_period in seconds. proprio_names: the robot-state inputs (none by default).
    Returns out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f'{out_dir}: not empty; a bundle is built into a new directory')
    cfg = tokenizer.config
    model = new_main_model(preset, seed, cfg.num_layers, cfg.codes_per_layer, cfg.levels,
                           proprio_names)
    write_bundle(model, tokenizer, out_dir, action_names, control_period, {
        'preset': preset, 'backbone_sizes': asdict(PRESETS[preset]), 'seed': seed,
        'weights': RANDOM_WEIGHTS, **(provenance or {})})
    return out_dir


def make_test_bundle(directory: str | Path, seed: int = 0,
                     proprio_names: tuple[str, ...] = ()) -> Path:
    """A complete tiny bundle for tests (no draft): 'tiny' preset, action tokenizer fitted for a
    few steps on synthetic chunks, robot-state inputs `proprio_names` (none by default). Builds
    in a few seconds; returns the bundle directory."""
    from rsd_core.train_tokenizer import fit_tokenizer, synthetic_chunks

    # fit_tokenizer trains on one thread (two spin-wait on a busy machine: 10x slower).
    tokenizer, _ = fit_tokenizer(synthetic_chunks(256, seed=seed), steps=40, seed=seed,
                                 progress=False, source='synthetic: 256 chunks (test bundle)')
    return build_main_bundle(directory, 'tiny', tokenizer, seed=seed,
                             provenance={'purpose': 'tests', 'action_tokenizer': 'synthetic'},
                             proprio_names=proprio_names)


# ---------------------------------------------------------------- rsd build-default

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd build-default` options."""
    parser.add_argument('--out', default=None,
                        help='bundle directory (default: $RSD_MODEL_DIR, the colcon share dir, '
                             'or <repo>/models/default)')
    parser.add_argument('--if-missing', action='store_true',
                        help='do nothing when a complete bundle is already there')
    parser.add_argument('--force', action='store_true',
                        help='replace a bundle even when it holds trained weights')
    parser.add_argument('--preset', default='default', choices=sorted(PRESETS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--demos', nargs='+', default=None, metavar='HDF5',
                        help='fit the action tokenizer on LIBERO HDF5 demos instead of '
                             'synthetic chunks')
    parser.add_argument('--tokenizer-steps', type=int, default=None,
                        help='action tokenizer training steps (default: its trainer default)')
    parser.add_argument('--observations', default=None, metavar='DIR',
                        help='observation directory for the draft (default: synthetic images)')
    parser.add_argument('--draft', action=argparse.BooleanOptionalAction, default=True,
                        help='distil the default draft into <bundle>/draft')
    parser.add_argument('--draft-samples', type=int, default=512,
                        help='samples recorded from the main model for the draft')
    parser.add_argument('--draft-epochs', type=int, default=40, help='draft training epochs')


def run(args: argparse.Namespace) -> int:
    """`rsd build-default`: build the bundle in a staging directory, then swap it in; exit 1
    on failure."""
    out_dir = Path(args.out).expanduser() if args.out else default_bundle_dir()
    problems = bundle_problems(out_dir)
    if args.if_missing and not problems:
        logger.info('bundle at %s is complete; nothing to do', out_dir)
        return 0
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        logger.error('%s exists and is not a bundle; refusing to replace it', out_dir)
        return 1
    trained = trained_by(out_dir)
    if trained and not args.force:
        logger.error('%s holds trained weights (%s); refusing to replace them with an untrained '
                     'bundle (give --out elsewhere, or --force)', out_dir, trained)
        return 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.building-', dir=out_dir.parent))
    try:
        build_bundle(staging, args)
        make_readable(staging)
        replace_dir(staging, out_dir)
    except (ValueError, RuntimeError, OSError) as exc:
        logger.error('build failed: %s', exc)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info('bundle ready at %s (%.1f MB)', out_dir, dir_size(out_dir) / 1e6)
    return 0


def trained_by(bundle_dir: Path) -> str | None:
    """The provenance 'weights' entry of a bundle whose weights are not RANDOM_WEIGHTS, else
    None (also when there is no readable manifest)."""
    try:
        weights = load_manifest(bundle_dir / MANIFEST, BUNDLE_FORMAT)['provenance']['weights']
    except (CheckpointError, OSError, KeyError, TypeError):
        return None
    return None if weights == RANDOM_WEIGHTS else str(weights)


def build_bundle(bundle_dir: Path, args: argparse.Namespace) -> None:
    """The phases of `rsd build-default`: action tokenizer, main model, draft."""
    steps = 3 if args.draft else 2
    started = time.perf_counter()
    logger.info('[1/%d] action tokenizer: fitting on %s', steps,
                f'{len(args.demos)} demo file(s)' if args.demos else 'synthetic chunks')
    tokenizer = fit_action_tokenizer(args.demos, args.seed, args.tokenizer_steps)
    logger.info('[1/%d] action tokenizer done (%.1f s)', steps, time.perf_counter() - started)
    started = time.perf_counter()
    logger.info('[2/%d] main model: building preset %r (seed %d)', steps, args.preset, args.seed)
    build_main_bundle(bundle_dir, args.preset, tokenizer, seed=args.seed, provenance={
        'action_tokenizer': {'demos': [str(p) for p in args.demos]} if args.demos
        else 'synthetic chunks'})
    logger.info('[2/%d] main model done (%.1f s)', steps, time.perf_counter() - started)
    if args.draft:
        started = time.perf_counter()
        logger.info('[3/3] draft: distilling from the main model (%d samples, %d epochs)',
                    args.draft_samples, args.draft_epochs)
        build_draft(bundle_dir, args.observations, args.seed, args.draft_samples,
                    args.draft_epochs)
        logger.info('[3/3] draft done (%.1f s)', time.perf_counter() - started)


def fit_action_tokenizer(demos: list[str] | None, seed: int,
                         steps: int | None) -> ActionTokenizer:
    """The action tokenizer of a new bundle, fitted on demos or on synthetic chunks."""
    from rsd_core.train_tokenizer import (
        DEFAULT_STEPS,
        DEFAULT_SYNTHETIC,
        fit_tokenizer,
        load_demo_chunks,
        synthetic_chunks,
    )

    if demos:
        chunks, source = load_demo_chunks(demos), f'demos: {", ".join(demos)}'
    else:
        chunks = synthetic_chunks(DEFAULT_SYNTHETIC, seed=seed)
        source = f'synthetic: {DEFAULT_SYNTHETIC} chunks, seed {seed}'
    tokenizer, _ = fit_tokenizer(chunks, steps=DEFAULT_STEPS if steps is None else steps,
                                 seed=seed, source=source)
    return tokenizer


def build_draft(bundle_dir: Path, observations: str | None, seed: int, samples: int,
                epochs: int) -> None:
    """Distil the default draft into <bundle>/draft on observations (a directory, or None:
    synthetic images)."""
    from rsd_core.distill import distill_draft, summary_line, write_synthetic_observations

    with tempfile.TemporaryDirectory(prefix='rsd-observations-') as scratch:
        if observations is None:
            logger.info('draft: no --observations given, using synthetic images')
            observations = write_synthetic_observations(scratch, seed=seed)
        metrics = distill_draft(bundle_dir, observations, bundle_dir / 'draft',
                                samples=samples, epochs=epochs, seed=seed)
    logger.info('draft: %s', summary_line(metrics))


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished bundle into place, replacing an older bundle (never other data)."""
    if out_dir.exists():
        old = out_dir.with_name(f'.{out_dir.name}.old-{os.getpid()}')
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def make_readable(directory: Path) -> None:
    """Give a staged bundle the permissions of the umask (temporary directories and
    safetensors files are created owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob('*')]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def dir_size(directory: Path) -> int:
    """Total size in bytes of the files below `directory`."""
    return sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())
