"""Building bundles: the built-in backbone presets, a new main model, writing a bundle.

The built-in presets are small randomly initialised LLaVAs (CLIP-shaped vision tower, Llama
language model) so the whole stack runs on a CPU; their shapes are those of an OpenVLA-style
checkpoint, which loads through the same code. `write_bundle` is what every producer of a bundle
calls (`rsd build-default`, `rsd train-policy`); the layout it writes is `rsd_core.bundle`'s.
"""

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
import shutil

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from rsd_core.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    DEFAULT_ACTION_NAMES,
    FILE_HASHES,
    MANIFEST,
    bundle_weights_sha256,
    file_hash_problems,
    file_hashes,
    load_bundle_manifest,
)
from rsd_core.checkpoint import current_umask, file_sha256, write_manifest
from rsd_core.main_model import MainModel, quiet_transformers
from rsd_core.processor import PromptProcessor, build_text_tokenizer
from rsd_core.tokenizer import ActionTokenizer

# provenance['weights'] of a bundle built untrained; anything else holds weights worth keeping.
RANDOM_WEIGHTS = 'random initialisation'


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


def llava_config(preset: BackbonePreset, text_tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """The transformers LlavaConfig of a preset, sized to the text tokenizer's vocabulary."""
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
                   proprio_names: tuple[str, ...] = ()) -> MainModel:
    """A randomly initialised MainModel of a preset (float32, CPU, eval mode), with a
    proprioception input of `proprio_names` if any; the global torch RNG is left untouched."""
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


def write_bundle(model: MainModel, tokenizer: ActionTokenizer, out_dir: str | Path,
                 action_names: tuple[str, ...] | list[str], control_period: float,
                 provenance: dict) -> str:
    """Write a MainModel and its fitted ActionTokenizer as a complete bundle (no draft) into
    out_dir: backbone/, heads, action_tokenizer/, then manifest.json last.

    An older bundle's manifest, backbone/ and draft/ are removed first (a stale draft would not
    match the new weights). control_period in seconds. provenance: recorded in the manifest
    (after 'created' and the library versions, which it may override). Returns the weights
    sha256.
    """
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
        FILE_HASHES: file_hashes(out_dir),
        'provenance': {'created': datetime.now(UTC).isoformat(timespec='seconds'),
                       'transformers_version': transformers.__version__,
                       'torch_version': torch.__version__, **provenance},
    }
    write_manifest(out_dir / MANIFEST, manifest)
    return weights


def replace_action_tokenizer(bundle_dir: str | Path, tokenizer: ActionTokenizer,
                             replaced_by: str) -> str:
    """Swap a bundle's action tokenizer for `tokenizer` (same codes: a refitted decoder) and
    record the new file's hash in the manifest, with `replaced_by` and the time. The bundle's
    files must match its manifest first (a corrupted bundle is never re-blessed); the weights
    hash (backbone and heads) is unchanged, so its draft stays valid. Returns the new
    tokenizer's sha256."""
    bundle_dir = Path(bundle_dir)
    manifest = load_bundle_manifest(bundle_dir)
    problems = file_hash_problems(bundle_dir, manifest)
    if problems:
        raise ValueError(f'{bundle_dir}: weight files do not match the manifest, not replacing '
                         'its tokenizer: ' + '; '.join(problems))
    target, staging = bundle_dir / 'action_tokenizer', bundle_dir / '.action_tokenizer-new'
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save(staging)
    old = bundle_dir / '.action_tokenizer-old'
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)
    digest = file_sha256(target / 'action_tokenizer.safetensors')
    manifest[FILE_HASHES]['action_tokenizer/action_tokenizer.safetensors'] = digest
    manifest['provenance']['action_tokenizer_replaced'] = {
        'by': replaced_by, 'time': datetime.now(UTC).isoformat(timespec='seconds'),
        'sha256': digest}
    write_manifest(bundle_dir / MANIFEST, manifest)
    return digest


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


def make_readable(directory: Path) -> None:
    """Give a staged bundle the permissions of the umask (temporary directories and
    safetensors files are created owner-only)."""
    umask = current_umask()
    for path in [directory, *directory.rglob('*')]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
