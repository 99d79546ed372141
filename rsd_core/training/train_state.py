"""The train state of a policy run: its optimizer, the optimizer's safetensors serialisation, and
resumable checkpoints (no pickles anywhere).

    <out>/checkpoint/step-<N>/  model.safetensors (+ .json)      the trained parameters
                                optimizer.safetensors (+ .json)  AdamW moments, param groups
                                state.json                       step, identity, settings, history

A checkpoint is staged and renamed into place, and only the newest is kept.
"""

from collections import defaultdict
import json
from pathlib import Path
import shutil
import tempfile

import torch

from rsd_core.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_manifest,
    load_tensors,
    save_component,
)
from rsd_core.main_model import MainModel

STATE_FORMAT = 'rsd-train-policy-state'
STATE_VERSION = 1


def trainable(model: MainModel) -> dict[str, torch.nn.Parameter]:
    """Parameters that train, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: MainModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not on biases, norms or embeddings)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(trainable(model).values())
    decay = [p for p in params if p.ndim >= 2 and id(p) not in tables]
    rest = [p for p in params if not (p.ndim >= 2 and id(p) not in tables)]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                              {'params': rest, 'weight_decay': 0.0}], lr=lr)


def optimizer_tensors(model: MainModel, optimizer: torch.optim.Optimizer,
                      ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as safetensors-ready tensors '<param name>/<key>' + JSON param groups."""
    names = {id(p): n for n, p in trainable(model).items()}
    state = optimizer.state_dict()
    order = [p for group in optimizer.param_groups for p in group['params']]
    tensors = {f'{names[id(order[i])]}/{key}': value
               for i, values in state['state'].items() for key, value in values.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in state['param_groups']]
    return tensors, groups


def load_optimizer(model: MainModel, optimizer: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor], groups: list[dict], where: str) -> None:
    """Inverse of `optimizer_tensors`; CheckpointError when the parameters do not match."""
    position = {id(p): i for i, p in
                enumerate(p for group in optimizer.param_groups for p in group['params'])}
    index = {n: position[id(p)] for n, p in trainable(model).items()}
    state = defaultdict(dict)
    for key, value in tensors.items():
        name, _, slot = key.rpartition('/')
        if name not in index:
            raise CheckpointError(f'{where}: optimizer state for unknown parameter {name!r}')
        state[index[name]][slot] = value
    if len(groups) != len(optimizer.param_groups) or any(
            len(g['params']) != len(h['params']) for g, h in
            zip(groups, optimizer.param_groups, strict=True)):
        raise CheckpointError(f'{where}: optimizer parameter groups do not match the model')
    groups = [{k: tuple(v) if k == 'betas' else v for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({'state': dict(state), 'param_groups': groups})


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints <out>/checkpoint/step-<N> (with state.json), oldest first."""
    root = out / 'checkpoint'
    found = [p for p in root.glob('step-*') if (p / 'state.json').is_file()] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix('step-')))


def save_checkpoint(out: Path, model: MainModel, optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:
    """Write <out>/checkpoint/step-<N> (staged, then renamed) and drop older ones."""
    root = out / 'checkpoint'
    final = root / f'step-{state["step"]:08d}'
    staging = Path(tempfile.mkdtemp(prefix='.staging-', dir=root))
    try:
        params = {n: p.detach() for n, p in trainable(model).items()}
        save_component(staging, 'model', params, {'format': 'rsd-train-policy-model'})
        tensors, groups = optimizer_tensors(model, optimizer)
        save_component(staging, 'optimizer', tensors, {'format': 'rsd-train-policy-optimizer',
                                                       'param_groups': groups})
        state = dict(state, format=STATE_FORMAT, version=STATE_VERSION)
        (staging / 'state.json').write_text(json.dumps(state, indent=2, sort_keys=True) + '\n')
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-1]:
        shutil.rmtree(old)
    return final


def load_checkpoint(directory: Path, model: MainModel,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters and optimizer state from a step-<N> directory; return its state."""
    state = load_manifest(directory / 'state.json', STATE_FORMAT)
    if state.get('version') != STATE_VERSION:
        raise CheckpointError(f'{directory}/state.json: version {state.get("version")!r}, '
                              f'this code reads {STATE_VERSION}')
    params = trainable(model)
    tensors = load_tensors(directory / 'model.safetensors')
    check_state_dict(tensors, params, str(directory / 'model'))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    manifest = load_manifest(directory / 'optimizer.json', 'rsd-train-policy-optimizer')
    load_optimizer(model, optimizer, load_tensors(directory / 'optimizer.safetensors'),
                   manifest['param_groups'], str(directory))
    return state
