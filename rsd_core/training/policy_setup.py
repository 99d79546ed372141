"""Setting up a behaviour-cloning run: the demos, the action tokenizer, the model to train, and
the identity a resumed run must share with the run it continues.

The tokenizer is the checkpoint's (resume), `--tokenizer DIR`, or fitted on the training
episodes' chunks; the model is the `--init` bundle or a new preset model, given a
proprioception input standardised with the training episodes' robot state.
"""

from dataclasses import asdict, dataclass, field
import json
import logging
from pathlib import Path

import numpy as np
import torch

from rsd_core.bundle import DEFAULT_ACTION_NAMES, MANIFEST, load_bundle_manifest
from rsd_core.bundle_build import PRESETS, new_main_model
from rsd_core.main_model import MainModel
from rsd_core.tokenizer import ActionTokenizer, TokenizerConfig
from rsd_core.training.demo_dataset import DemoData
from rsd_core.training.demos import (
    PROPRIO_NAMES,
    Episode,
    demo_provenance,
    episode_chunks,
    read_episodes,
    split_episodes,
)
from rsd_core.training.frames import FrameReader
from rsd_core.training.policy_config import TrainPolicyConfig
from rsd_core.training.tokenizer_fit import fit_tokenizer
from rsd_core.training.train_state import checkpoint_dirs

logger = logging.getLogger(__name__)

# Settings a resumed run must share with the run it continues (anything else may change).
RESUME_KEYS = ('demos', 'init', 'preset', 'seed', 'heldout_fraction', 'freeze_vision',
               'proprio')
# Identity keys added after the first checkpoints, with the value those checkpoints imply.
LATER_KEYS = {'proprio': False}


@dataclass
class Run:
    """Everything one training run holds."""

    config: TrainPolicyConfig
    out: Path
    model: MainModel
    tokenizer: ActionTokenizer
    episodes: list[Episode]
    frames: FrameReader
    data: DemoData
    train_episodes: list[int]
    held_episodes: list[int]
    demos: list[dict]
    action_names: list[str]
    control_period: float
    source: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def identity(config: TrainPolicyConfig, demos: list[dict]) -> dict:
    """What a resumed run must share with the run it continues (RESUME_KEYS)."""
    return {'demos': [d['sha256'] for d in demos],
            'init': str(Path(config.init).resolve()) if config.init else None,
            'preset': None if config.init else config.preset, 'seed': config.seed,
            'heldout_fraction': config.heldout_fraction, 'freeze_vision': config.freeze_vision,
            'proprio': config.proprio}


def build_model(config: TrainPolicyConfig, tokenizer_config: TokenizerConfig,
                ) -> tuple[MainModel, list[str], float, dict]:
    """The model to train: the --init bundle, or a new preset model. Returns (model, action
    names, control period, source description)."""
    if config.init:
        manifest = load_bundle_manifest(config.init)
        model = MainModel.from_dir(config.init, device=config.device, dtype=torch.float32)
        source = {'init': str(Path(config.init).resolve()),
                  'init_weights_sha256': manifest['weights_sha256']}
        return model, manifest['action_names'], manifest['control_period_s'], source
    model = new_main_model(config.preset, config.seed, tokenizer_config.num_layers,
                           tokenizer_config.codes_per_layer, tokenizer_config.levels)
    source = {'preset': config.preset, 'backbone_sizes': asdict(PRESETS[config.preset])}
    return model, list(DEFAULT_ACTION_NAMES), 0.05, source


def get_tokenizer(config: TrainPolicyConfig, out: Path, episodes: list[Episode],
                  train_episodes: list[int], resuming: bool) -> ActionTokenizer:
    """Resume: the checkpoint's tokenizer; --tokenizer DIR; else fitted on the training
    episodes' chunks. Saved to <out>/checkpoint/action_tokenizer."""
    saved = out / 'checkpoint' / 'action_tokenizer'
    if resuming:
        return ActionTokenizer.load(saved)
    if config.tokenizer:
        tokenizer = ActionTokenizer.load(config.tokenizer)
    else:
        chunk_len = TokenizerConfig().chunk_len
        chunks = np.concatenate([episode_chunks(episodes[i].actions, chunk_len)
                                 for i in train_episodes])
        files = sorted({str(episodes[i].file) for i in train_episodes})
        tokenizer, _ = fit_tokenizer(chunks, steps=config.tokenizer_steps, seed=config.seed,
                                     progress=config.progress, num_threads=config.threads,
                                     source=f'demos (training episodes): {", ".join(files)}')
    tokenizer.save(saved)
    return tokenizer


def set_proprio(model: MainModel, proprio: bool, episodes: list[Episode],
                train_episodes: list[int]) -> None:
    """Give the model a new proprioception input standardised with the training episodes'
    state statistics (kept as it is when the --init model has one), or refuse a mismatch."""
    if not proprio:
        if model.proprio is not None:
            raise ValueError(f'the --init model takes proprioception '
                             f'({", ".join(model.proprio_names)}); drop --no-proprio')
        return
    if model.proprio is not None:
        if model.proprio_names != PROPRIO_NAMES:
            raise ValueError(f'the --init model reads proprio {list(model.proprio_names)}, the '
                             f'demos give {list(PROPRIO_NAMES)}')
        return                          # fine-tuning keeps the statistics it was trained with
    model.add_proprio(PROPRIO_NAMES)
    states = torch.from_numpy(np.concatenate([episodes[i].proprio for i in train_episodes]))
    model.proprio.set_statistics(states.mean(0), states.std(0))  # [P] each


def check_compatible(model: MainModel, tokenizer: ActionTokenizer, action_dim: int) -> None:
    """ValueError unless the tokenizer's (L, C, V) match the model's heads and its action
    dims the demos'."""
    cfg = tokenizer.config
    found = (cfg.num_layers, cfg.codes_per_layer, cfg.levels)
    wanted = (model.num_layers, model.codes_per_layer, model.levels)
    if found != wanted:
        raise ValueError(f"action tokenizer (L, C, V) = {found} does not match the model's "
                         f'heads {wanted}; pass a matching --tokenizer')
    if cfg.action_dim != action_dim:
        raise ValueError(f'action tokenizer has {cfg.action_dim} action dims, the demos '
                         f'{action_dim}')


def prepare(config: TrainPolicyConfig) -> tuple[Run, Path | None]:
    """Read the demos, get the tokenizer and the model; returns the run and the checkpoint to
    resume from (None for a new run)."""
    out = Path(config.out)
    checkpoints = checkpoint_dirs(out) if config.resume else []
    if not config.resume and out.exists() and any(out.iterdir()):
        raise ValueError(f'{out}: not empty; continue a run with --resume or choose a new '
                         'directory')
    episodes = read_episodes(config.demos, proprio=config.proprio)
    demos = demo_provenance(episodes)
    (out / 'checkpoint').mkdir(parents=True, exist_ok=True)
    if checkpoints:
        saved = json.loads((checkpoints[-1] / 'state.json').read_text()).get('identity', {})
        wanted = identity(config, demos)
        saved = {**LATER_KEYS, **saved}
        changed = [f'{k} {saved.get(k)!r} -> {wanted[k]!r}' for k in RESUME_KEYS
                   if saved.get(k) != wanted[k]]
        if changed:
            raise ValueError(f'{checkpoints[-1]}: cannot resume, these differ from the saved '
                             f'run: {"; ".join(changed)}')
    elif config.resume and (out / MANIFEST).is_file():
        raise ValueError(f'{out}: holds a bundle but no training checkpoint to resume; '
                         'refusing to overwrite it')
    elif config.resume:
        logger.info('%s: no checkpoint to resume; starting a new run', out)
    train_ep, held_ep = split_episodes(episodes, config.heldout_fraction, config.seed)
    tokenizer = get_tokenizer(config, out, episodes, train_ep, bool(checkpoints))
    model, names, period, source = build_model(config, tokenizer.config)
    check_compatible(model, tokenizer, episodes[0].actions.shape[1])
    set_proprio(model, config.proprio, episodes, train_ep)
    frames = FrameReader(episodes, model.processor.image_size, config.cache_mb)
    data = DemoData(episodes, model, tokenizer, frames)
    run = Run(config, out, model, tokenizer, episodes, frames, data, train_ep, held_ep, demos,
              names, period, source)
    return run, checkpoints[-1] if checkpoints else None
