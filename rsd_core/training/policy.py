"""The behaviour-cloning run of `rsd train-policy`: steps, periodic evaluation, checkpoints, the
bundle, the draft.

One sample is frame t of a demo (the agent-view image, rotated 180 degrees from LIBERO's raw
orientation to upright, as a camera and the sim bridge deliver it) with its task language, and
the action chunk t..t+T-1 (padded with the episode's last action) as target codes [L, C]
(`rsd_core.training.demo_dataset`). Training is teacher forcing over the residual layers in one
causal forward pass (`rsd_core.training.teacher_forcing`) with cross-entropy over all L x C
codes. Backbone, RFSQ head and layer embedding are all trained (AdamW, linear warm-up + cosine
decay, gradient clipping). Training images get random resized crops and colour jitter;
held-out episodes (split per task) get none and report per-layer token accuracy and the action
L1 error of main-only greedy decoding (`rsd_core.training.policy_eval`).

Output directory:

    <out>/                  a complete bundle (docs/ARCHITECTURE.md), provenance records the demos
                            (paths + sha256), steps, seed, settings and metrics
    <out>/draft/            the default draft distilled from the trained model (--distill-draft),
                            on observations written from the demo frames
    <out>/checkpoint/       action_tokenizer/ + step-<N>/{model,optimizer}.safetensors +
                            state.json: resume with --resume (no pickles anywhere)

CPU (this machine): `rsd train-policy --demos demos/ --out models/bc --preset default`.
Use --threads 1 when the cores are shared (two threads under load are ~10x slower).

Fine-tuning a larger LLaVA-style backbone on a GPU (e.g. an OpenVLA-style checkpoint converted to
a bundle with its own `backbone/`, heads and action tokenizer):

    rsd train-policy --demos libero_spatial/ --out models/bc-7b --init models/llava-7b \\
        --tokenizer models/llava-7b/action_tokenizer --device cuda --dtype bfloat16 \\
        --batch-size 8 --grad-accum 4 --lr 2e-5 --warmup-steps 200 --steps 20000 \\
        --freeze-vision --gradient-checkpointing --threads 4 --cache-mb 8192

--init loads the bundle (its prompt template, action names and control period are kept),
--dtype bfloat16 runs the forward under autocast while the master weights and AdamW moments stay
float32 (a 7B needs ~16 bytes per trained parameter plus activations: shard or freeze parts),
--freeze-vision keeps the vision tower fixed, --gradient-checkpointing trades compute for
activation memory, --grad-accum multiplies the effective batch. Only the small built-in
backbones are exercised on this machine.
"""

from dataclasses import asdict
import logging
import math
from pathlib import Path
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from rsd_core.bundle_build import make_readable, write_bundle
from rsd_core.cpu_features import EMULATED_BF16_WARNING, emulated_bfloat16
from rsd_core.threads import torch_threads
from rsd_core.training.augmentation import seeded_generator
from rsd_core.training.distill import distill_draft
from rsd_core.training.draft_training import draft_summary_line as draft_summary
from rsd_core.training.frames import write_frame_observations
from rsd_core.training.objective import layer_cross_entropy, token_accuracy
from rsd_core.training.policy_config import TrainPolicyConfig
from rsd_core.training.policy_eval import baselines, evaluate_policy
from rsd_core.training.policy_setup import Run, identity, prepare
from rsd_core.training.schedule import learning_rate
from rsd_core.training.teacher_forcing import (
    AUTOCAST_DTYPES,
    autocast,
    teacher_forced_logits,
    training_attention,
)
from rsd_core.training.train_state import (
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    trainable,
)

logger = logging.getLogger(__name__)

WEIGHTS = 'behaviour cloning (rsd train-policy)'  # provenance['weights'] of its bundles


def micro_batch(run: Run, train_pool: np.ndarray, micro: int) -> tuple[float, torch.Tensor]:
    """Forward and backward of micro-batch `micro` of step run.step (gradients scaled by
    1 / grad_accum); returns its loss and per-layer token accuracy [L]."""
    config, model = run.config, run.model
    seeds = [config.seed, run.step, micro]
    indices = run.data.draw(train_pool, config.batch_size, np.random.default_rng(seeds))
    generator = seeded_generator(*seeds) if config.augment else None
    inputs, codes = run.data.batch(indices, generator)
    codes = codes.to(model.device)
    with autocast(model.device, config.dtype):
        logits = teacher_forced_logits(model, inputs, codes)  # [B, L, C, V]
    loss = layer_cross_entropy(logits, codes).mean()
    (loss / config.grad_accum).backward()
    with torch.no_grad():
        return loss.item(), token_accuracy(logits.argmax(-1), codes)


def train_step(run: Run, optimizer: torch.optim.Optimizer, train_pool: np.ndarray,
               warmup: int) -> tuple[float, torch.Tensor]:
    """One optimiser step (grad_accum micro-batches) at run.step; returns (loss, per-layer
    token accuracy [L]) of the step's batches."""
    config, model = run.config, run.model
    lr = learning_rate(run.step, config.steps, config.lr, warmup)
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    total, accuracy = 0.0, 0.0
    with training_attention(model.device, config.dtype):
        for micro in range(config.grad_accum):
            loss, micro_accuracy = micro_batch(run, train_pool, micro)
            total += loss / config.grad_accum
            accuracy = accuracy + micro_accuracy / config.grad_accum
    torch.nn.utils.clip_grad_norm_(list(trainable(model).values()), config.grad_clip)
    optimizer.step()
    return total, accuracy.cpu()


def train_loop(run: Run, optimizer: torch.optim.Optimizer, eval_batches: list[np.ndarray],
               ) -> None:
    """Steps run.step..steps-1 with periodic held-out evaluation and checkpoints."""
    config = run.config
    warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 20
    train_pool = run.data.samples_of(run.train_episodes)
    losses, accuracies = [], []
    end = min(config.steps, config.stop_after or config.steps)
    run.model.train()
    bar = tqdm(total=config.steps, initial=run.step, desc='train policy', file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True)
    while run.step < end:
        started = time.perf_counter()
        loss, accuracy = train_step(run, optimizer, train_pool, warmup)
        run.step_seconds.append(time.perf_counter() - started)
        if not math.isfinite(loss):
            raise RuntimeError(f'training loss became {loss} at step {run.step}; lower --lr or '
                               'use --dtype float32')
        losses.append(loss)
        accuracies.append(accuracy)
        run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f'{loss:.3f}', acc0=f'{float(accuracy[0]):.2f}')
        done = run.step == config.steps
        if run.step % config.eval_every == 0 or done:
            record = {'step': run.step, 'lr': learning_rate(run.step - 1, config.steps,
                                                             config.lr, warmup),
                      'train_loss': float(np.mean(losses)),
                      'train_token_accuracy': torch.stack(accuracies).mean(0).tolist(),
                      'seconds_per_step': float(np.median(run.step_seconds[-len(losses):]))}
            if eval_batches:
                record['held_out'] = evaluate_policy(run.model, run.tokenizer, run.data,
                                                     eval_batches, config.dtype)
            run.history.append(record)
            logger.info('step %d: %s', run.step, progress_line(record))
            losses, accuracies = [], []
        if run.step % config.save_every == 0 or run.step == end:
            save_checkpoint(run.out, run.model, optimizer, run_state(run))
    bar.close()


def run_state(run: Run) -> dict:
    """The state.json content of a checkpoint: step, resume identity, settings, history."""
    config = {k: v for k, v in asdict(run.config).items() if k != 'progress'}
    return {'step': run.step, 'identity': identity(run.config, run.demos), 'config': config,
            'history': run.history, 'step_seconds': run.step_seconds[-1000:]}


def progress_line(record: dict) -> str:
    """One evaluation record (train and held-out loss, accuracy, action L1) as one line."""
    line = (f'train loss {record["train_loss"]:.4f}, layer-0 acc '
            f'{record["train_token_accuracy"][0]:.3f}')
    held = record.get('held_out')
    if held:
        line += (f'; held-out loss {held["loss"]:.4f}, token acc '
                 + ' '.join(f'{a:.2f}' for a in held['token_accuracy'])
                 + f', action L1 {held["action_l1"]:.4f}')
    return line


def train_policy(config: TrainPolicyConfig) -> dict:
    """Behaviour-clone the main model on demos; write the bundle (and draft) to config.out.

    Returns the metrics: history (per evaluation), final held-out metrics, baselines, median
    seconds per step, bundle weights hash, draft metrics (when distilled).
    """
    config.check()
    device = torch.device(config.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} requested but CUDA is not available here')
    if emulated_bfloat16(device, AUTOCAST_DTYPES[config.dtype]):
        logger.warning(EMULATED_BF16_WARNING)
    with torch_threads(config.threads), tempfile.TemporaryDirectory(prefix='rsd-bc-') as tmp:
        run, resume_from = prepare(config)
        try:
            return _train_and_save(run, resume_from, device, Path(tmp))
        finally:
            run.frames.close()


def _train_and_save(run: Run, resume_from: Path | None, device: torch.device,
                    scratch: Path) -> dict:
    """Train from the checkpoint (or step 0), then write the bundle and distil the draft."""
    config, model = run.config, run.model
    model.to(device).train().requires_grad_(True)
    if config.freeze_vision:
        model.backbone.model.vision_tower.requires_grad_(False)
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable()
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        run.step, run.history = int(state['step']), list(state.get('history', []))
        run.step_seconds = list(state.get('step_seconds', []))
        if run.step > config.steps:
            raise ValueError(f'{resume_from}: checkpoint at step {run.step} is past --steps '
                             f'{config.steps}')
        changed = {k: (v, getattr(config, k)) for k, v in state.get('config', {}).items()
                   if k not in ('resume', 'steps', 'stop_after') and hasattr(config, k)
                   and v != getattr(config, k)}
        if changed:
            logger.warning('resuming with changed settings: %s', ', '.join(
                f'{k} {old!r} -> {new!r}' for k, (old, new) in changed.items()))
        logger.info('resumed from %s at step %d', resume_from, run.step)
    train_pool = run.data.samples_of(run.train_episodes)
    held_pool = run.data.samples_of(run.held_episodes)
    eval_batches = run.data.eval_batches(held_pool, config.eval_samples, config.batch_size) \
        if len(held_pool) else []
    logger.info('%d training samples (%d episodes), %d held-out (%d episodes); %d parameters '
                'trained', len(train_pool), len(run.train_episodes), len(held_pool),
                len(run.held_episodes), sum(p.numel() for p in trainable(model).values()))
    train_loop(run, optimizer, eval_batches)
    if run.step < config.steps:
        logger.info('stopped at step %d of %d (checkpointed); continue with --resume',
                    run.step, config.steps)
        return {'steps': run.step, 'stopped': True, 'history': run.history,
                'seconds_per_step': float(np.median(run.step_seconds))}
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_disable()
    model.eval()
    metrics = final_metrics(run, train_pool, held_pool)
    weights = write_bundle(model.cpu().float(), run.tokenizer, run.out, run.action_names,
                           run.control_period, provenance(run, metrics))
    make_readable(run.out)
    metrics['weights_sha256'] = weights
    logger.info('bundle written to %s (weights %s)', run.out, weights[:12])
    if config.distill_draft:
        metrics['draft'] = distill(run, scratch / 'observations')
    return metrics


def final_metrics(run: Run, train_pool: np.ndarray, held_pool: np.ndarray) -> dict:
    """Metrics of a finished run: history, last evaluation, sample counts, baselines."""
    last = run.history[-1] if run.history else {}
    seconds = run.step_seconds
    metrics = {'steps': run.step, 'history': run.history,
               'train_samples': len(train_pool), 'held_out_samples': len(held_pool),
               'train_episodes': len(run.train_episodes),
               'held_out_episodes': len(run.held_episodes),
               'seconds_per_step': float(np.median(seconds)) if seconds else None,
               'final': {k: v for k, v in last.items() if k != 'lr'}}
    if len(held_pool):
        metrics['baselines'] = baselines(run.tokenizer, run.data, train_pool, held_pool)
    return metrics


def provenance(run: Run, metrics: dict) -> dict:
    """The bundle manifest's provenance: model source, seed, settings, demos, metrics."""
    config = run.config
    settings = {k: getattr(config, k) for k in (
        'steps', 'batch_size', 'grad_accum', 'lr', 'weight_decay', 'warmup_steps', 'grad_clip',
        'dtype', 'heldout_fraction', 'augment', 'freeze_vision')}
    return {'weights': WEIGHTS, **run.source,
            'seed': config.seed, 'training': settings,
            'demos': run.demos,
            'action_tokenizer': {'path': config.tokenizer or 'fitted on the training episodes',
                                 'source': run.tokenizer.training_info.get('source')},
            'metrics': {k: v for k, v in metrics.items() if k != 'history'}}


def distill(run: Run, observations: Path) -> dict:
    """Distil the default draft into <out>/draft on frames of the demos."""
    config = run.config
    rng = np.random.default_rng([config.seed, 2])
    total = len(run.data)
    picks = np.sort(rng.choice(total, size=min(config.draft_observations, total), replace=False))
    samples = [(int(run.data.episode[i]), int(run.data.t[i])) for i in picks]
    write_frame_observations(run.frames, samples, observations)
    metrics = distill_draft(run.out, observations, run.out / 'draft',
                            samples=config.draft_samples, epochs=config.draft_epochs,
                            kind=config.draft_kind,
                            seed=config.seed, progress=config.progress, device=config.device)
    logger.info('draft: %s', draft_summary(metrics))
    return {k: v for k, v in metrics.items() if k != 'history'}
