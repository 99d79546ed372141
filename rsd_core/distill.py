"""`rsd train-draft`: distil the draft model from a main model on recorded observations.

1. Read an observation directory (index.jsonl + images, see docs/ARCHITECTURE.md) and multiply
   it with image augmentations (random resized crop, colour jitter, small rotation).
2. Run the main model on each sample: prefill -> h0 and layer 0, then K main-only greedy steps
   -> the main's own tokens for layers 1..K (exactly what verification compares against).
3. Train the whole draft (input projection + decoder layer + heads) with cross-entropy on those
   tokens; held-out split by source image (augmented copies never straddle the split); early
   stopping on held-out loss.
4. Report per-layer token accuracy, exact-layer match (all C codes equal, what exact acceptance
   needs) and the expected accepted prefix length on the held-out split, next to the untrained
   draft and a constant 'most frequent code' guess; save the draft with its provenance.
"""

import argparse
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
import json
import logging
import math
from pathlib import Path
import time

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsd_core.draft import MAX_PROPOSALS, DraftConfig, DraftModel
from rsd_core.main_model import MainModel

logger = logging.getLogger(__name__)

# LIBERO task language (libero_spatial, libero_object, libero_goal), for synthetic observations.
LIBERO_INSTRUCTIONS = (
    ('libero_spatial', 'pick up the black bowl between the plate and the ramekin and place it on '
                       'the plate'),
    ('libero_spatial', 'pick up the black bowl next to the ramekin and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl from table center and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the cookie box and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl in the top drawer of the wooden cabinet and place '
                       'it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the ramekin and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl next to the cookie box and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the stove and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl next to the plate and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the wooden cabinet and place it on the plate'),
    ('libero_object', 'pick up the alphabet soup and place it in the basket'),
    ('libero_object', 'pick up the cream cheese and place it in the basket'),
    ('libero_object', 'pick up the ketchup and place it in the basket'),
    ('libero_goal', 'open the middle drawer of the cabinet'),
    ('libero_goal', 'put the bowl on the plate'),
    ('libero_goal', 'put the wine bottle on top of the cabinet'),
    ('libero_goal', 'turn on the stove'),
)


@dataclass
class Observation:
    """One line of index.jsonl with its image path resolved.

    proprio: the robot state [P] float32 recorded with the image ('proprio' in the line), or
    None; needed by models with proprioception.
    """

    image: Path
    instruction: str
    meta: dict
    proprio: np.ndarray | None = None


@dataclass
class TrainConfig:
    """Optimisation settings of the draft distillation."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    label_smoothing: float = 0.05
    layer_decay: float = 0.8      # loss weight of proposal k is layer_decay**k: early layers gate
    dropout: float = 0.0          # the acceptance of later ones (prefix rule)
    held_out_frac: float = 0.2
    patience: int = 8             # epochs without held-out loss improvement before stopping
    grad_clip: float = 1.0


# ---------------------------------------------------------------- observations and augmentation

def read_observations(directory: str | Path, strict: bool = False) -> list[Observation]:
    """Parse `<dir>/index.jsonl`; skip (or, when strict, refuse) entries that cannot be used."""
    directory = Path(directory)
    index = directory / 'index.jsonl'
    if not index.is_file():
        raise ValueError(f'{directory}: not an observation directory (no index.jsonl); expected '
                         'index.jsonl + images/ as written by `rsd record-observations`')
    observations, skipped = [], []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image = directory / entry['image']
            instruction = entry['instruction']
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError('empty instruction')
            if not image.is_file():
                raise ValueError(f'image {image} not found')
            proprio = read_proprio(entry.get('proprio'))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f'{index}:{number}: {type(exc).__name__}: {exc}'
            if strict:
                raise ValueError(reason) from exc
            skipped.append(reason)
            continue
        meta = {k: v for k, v in entry.items() if k not in ('image', 'instruction', 'proprio')}
        observations.append(Observation(image, instruction.strip(), meta, proprio))
    for reason in skipped:
        logger.warning('skipped observation %s', reason)
    if len(observations) < 2:
        raise ValueError(f'{index}: {len(observations)} usable observations; at least 2 are '
                         'needed (one for training, one held out)')
    return observations


def read_proprio(value) -> np.ndarray | None:
    """An index.jsonl 'proprio' value (a list of finite numbers, or absent) -> [P] float32."""
    if value is None:
        return None
    problem = f'proprio must be a non-empty list of finite numbers, got {value!r}'
    try:
        state = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(problem) from exc
    if state.ndim != 1 or not state.size or not np.isfinite(state).all():
        raise ValueError(problem)
    return state


def proprio_batch(main: MainModel, observations: list[Observation]) -> dict:
    """{'proprio': [B, P]} of the observations when `main` takes proprioception, else {}."""
    if main.proprio is None:
        return {}
    size = len(main.proprio_names)
    bad = [o.image.name for o in observations if o.proprio is None or len(o.proprio) != size]
    if bad:
        raise ValueError(f'the main model takes proprioception ({size} values: '
                         f'{", ".join(main.proprio_names)}); observations {bad[:3]} have no '
                         'matching "proprio" list')
    return {'proprio': torch.from_numpy(np.stack([o.proprio for o in observations]))}


def load_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    with Image.open(path) as image:
        return np.array(image.convert('RGB'))


def augment(image: np.ndarray, rng: np.random.Generator, max_rotation_deg: float = 5.0,
            min_scale: float = 0.8, jitter: float = 0.2, max_hue: float = 0.03) -> np.ndarray:
    """Random small rotation, random resized crop (same output size), colour jitter.

    image [H, W, 3] uint8 -> [H, W, 3] uint8. min_scale: smallest crop area fraction;
    jitter: brightness/contrast/saturation factor range 1 +- jitter; max_hue: hue shift, turns.
    """
    pil = Image.fromarray(image)
    width, height = pil.size
    fill = tuple(int(c) for c in image.reshape(-1, 3).mean(0))
    pil = pil.rotate(rng.uniform(-max_rotation_deg, max_rotation_deg),
                     resample=Image.Resampling.BILINEAR, fillcolor=fill)
    area = rng.uniform(min_scale, 1.0) * width * height
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, round(math.sqrt(area * ratio)))
    crop_h = min(height, round(math.sqrt(area / ratio)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    pil = pil.resize((width, height), Image.Resampling.BILINEAR,
                     box=(left, top, left + crop_w, top + crop_h))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        pil = enhancer(pil).enhance(rng.uniform(1 - jitter, 1 + jitter))
    hsv = np.asarray(pil.convert('HSV')).copy()
    shift = round(rng.uniform(-max_hue, max_hue) * 255)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    return np.array(Image.fromarray(hsv, mode='HSV').convert('RGB'))


def write_synthetic_observations(directory: str | Path, count: int = 32, seed: int = 0,
                                 image_size: int = 128) -> Path:
    """Write an observation directory of random coloured shapes on a table-like background,
    each paired with a LIBERO instruction. For tests and for bundles built without LIBERO."""
    directory = Path(directory)
    (directory / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        top, bottom = rng.integers(40, 220, size=(2, 3))
        ramp = np.linspace(0.0, 1.0, image_size)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
        image = Image.fromarray(np.broadcast_to(background, (image_size, image_size, 3)).copy())
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, image_size - 16, size=2)
            w, h = rng.integers(12, image_size // 2, size=2)
            box = (int(x0), int(y0), int(min(image_size - 1, x0 + w)),
                   int(min(image_size - 1, y0 + h)))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            shape = int(rng.integers(0, 3))
            if shape == 0:
                draw.rectangle(box, fill=colour)
            elif shape == 1:
                draw.ellipse(box, fill=colour)
            else:
                apex = ((box[0] + box[2]) // 2, box[1])
                draw.polygon([(box[0], box[3]), (box[2], box[3]), apex], fill=colour)
        name = f'images/{i:06d}.png'
        image.save(directory / name)
        task_id = int(rng.integers(0, len(LIBERO_INSTRUCTIONS)))
        suite, instruction = LIBERO_INSTRUCTIONS[task_id]
        lines.append(json.dumps({'image': name, 'instruction': instruction, 'suite': suite,
                                 'task_id': task_id, 'init_state': int(rng.integers(0, 50)),
                                 'step': 0}))
    (directory / 'index.jsonl').write_text('\n'.join(lines) + '\n')
    return directory


# ---------------------------------------------------------------- recording the main's tokens

@dataclass
class Recording:
    """What the draft learns from. N samples, K proposals."""

    h0: torch.Tensor        # [N, H] float32, the main's prompt hidden state
    tokens: torch.Tensor    # [N, K, C] long, the main's greedy codes for layers 1..K
    margins: torch.Tensor   # [N, K, C] float32, the main's top-1 minus top-2 logit
    source: torch.Tensor    # [N] long, index of the source observation (for the split)


def sample_plan(num_sources: int, samples: int, augment_images: bool) -> list[tuple[int, int]]:
    """(source index, copy number) per sample; copy 0 is the unaugmented image."""
    if not augment_images and samples > num_sources:
        logger.warning('augmentation off: %d samples requested, %d source images; using %d',
                       samples, num_sources, num_sources)
        samples = num_sources
    return [(i % num_sources, i // num_sources) for i in range(samples)]


@torch.no_grad()
def main_greedy_targets(main: MainModel, inputs: dict, num_proposals: int,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Main-only greedy decoding of layers 0..K -> (h0 [B, H], tokens [B, K, C], margins)."""
    cache, h0, logits = main.prefill(inputs)  # logits: [B, C, V], layer 0
    codes, margins = [], []
    for layer in range(num_proposals):
        fed = logits.argmax(-1).unsqueeze(1)  # [B, 1, C], layer `layer`
        logits = main.forward_layers(cache, fed, first_layer=layer)[0][:, -1]  # [B, C, V]
        top2 = logits.float().topk(2, dim=-1).values  # [B, C, 2]
        codes.append(logits.argmax(-1))
        margins.append(top2[..., 0] - top2[..., 1])
    return h0.float(), torch.stack(codes, 1), torch.stack(margins, 1)


def record(main: MainModel, observations: list[Observation], plan: list[tuple[int, int]],
           num_proposals: int, seed: int, batch_size: int = 16,
           progress: bool = True) -> Recording:
    """Run the main on every planned (augmented) sample, batching equal instructions."""
    by_instruction = defaultdict(list)
    for sample, (source, _) in enumerate(plan):
        by_instruction[observations[source].instruction].append(sample)
    batches = [group[i:i + batch_size] for group in by_instruction.values()
               for i in range(0, len(group), batch_size)]
    device = main.device
    out = {}
    images_cache: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(plan), desc='recording main tokens', unit='sample', disable=not progress)
    for batch in batches:
        images = []
        for sample in batch:
            source, copy = plan[sample]
            if source not in images_cache:
                images_cache[source] = load_image(observations[source].image)
            image = images_cache[source]
            images.append(augment(image, np.random.default_rng([seed, sample]))
                          if copy else image)
        sources = [observations[plan[sample][0]] for sample in batch]
        inputs = main.processor(images, [sources[0].instruction] * len(batch))
        inputs.update(proprio_batch(main, sources))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        h0, tokens, margins = main_greedy_targets(main, inputs, num_proposals)
        for row, sample in enumerate(batch):
            out[sample] = (h0[row].cpu(), tokens[row].cpu(), margins[row].cpu())
        bar.update(len(batch))
    bar.close()
    order = range(len(plan))
    return Recording(h0=torch.stack([out[i][0] for i in order]),
                     tokens=torch.stack([out[i][1] for i in order]),
                     margins=torch.stack([out[i][2] for i in order]),
                     source=torch.tensor([plan[i][0] for i in order]))


def split_by_source(source: torch.Tensor, held_out_frac: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (train, held-out); all copies of one source image land on one side."""
    sources = source.unique()
    generator = torch.Generator().manual_seed(seed)
    shuffled = sources[torch.randperm(len(sources), generator=generator)]
    n_held = min(len(sources) - 1, max(1, round(held_out_frac * len(sources))))
    held = torch.isin(source, shuffled[:n_held])
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


# ---------------------------------------------------------------- training and evaluation

def layer_weights(num_proposals: int, decay: float) -> torch.Tensor:
    """[K] loss weights summing to 1."""
    weights = decay ** torch.arange(num_proposals, dtype=torch.float32)
    return weights / weights.sum()


def per_layer_loss(logits: torch.Tensor, tokens: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, K, C, V], tokens [B, K, C] -> mean cross-entropy per layer [K]."""
    loss = F.cross_entropy(logits.flatten(0, 2).float(), tokens.flatten(),
                           reduction='none', label_smoothing=label_smoothing)  # [B*K*C]
    return loss.view(tokens.shape).mean(dim=(0, 2))


def acceptance_metrics(predicted: torch.Tensor, tokens: torch.Tensor) -> dict:
    """predicted, tokens [N, K, C] -> per-layer token accuracy, exact-layer match, prefix rates.

    prefix_accept[k] = fraction of samples whose layers 1..k+1 all match exactly (what the exact
    rule accepts); mean_accepted_layers = their sum, the expected accepted proposals per chunk.
    """
    correct = predicted == tokens  # [N, K, C]
    exact = correct.all(-1)  # [N, K]
    prefix = exact.cumprod(-1).float().mean(0)  # [K]
    return {'token_accuracy': correct.float().mean(dim=(0, 2)).tolist(),
            'exact_match': exact.float().mean(0).tolist(),
            'prefix_accept': prefix.tolist(),
            'mean_accepted_layers': float(prefix.sum())}


@torch.no_grad()
def evaluate(model: DraftModel, h0: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
             label_smoothing: float = 0.0, batch_size: int = 256) -> dict:
    """loss: the training objective (weighted, smoothed CE); layer_ce: plain CE per layer
    [K]; plus acceptance_metrics."""
    model.eval()
    smoothed, plain, predicted = [], [], []
    for start in range(0, len(h0), batch_size):
        logits = model(h0[start:start + batch_size])  # [b, K, C, V]
        target = tokens[start:start + batch_size]
        smoothed.append(per_layer_loss(logits, target, label_smoothing) * len(logits))
        plain.append(per_layer_loss(logits, target) * len(logits))
        predicted.append(logits.argmax(-1))
    layer_loss = torch.stack(smoothed).sum(0) / len(h0)  # [K]
    return {'loss': float((weights.to(layer_loss) * layer_loss).sum()),
            'layer_ce': (torch.stack(plain).sum(0) / len(h0)).tolist(),
            **acceptance_metrics(torch.cat(predicted), tokens)}


def mode_baseline(train_tokens: torch.Tensor, held_tokens: torch.Tensor, levels: int) -> dict:
    """Acceptance of a constant guess: the most frequent training code at every position."""
    counts = F.one_hot(train_tokens, levels).sum(0)  # [K, C, V]
    guess = counts.argmax(-1).expand_as(held_tokens)  # [N, K, C]
    return acceptance_metrics(guess, held_tokens)


def learning_rate(step: int, steps: int, lr: float, warmup: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up to `lr` over `warmup`
    steps, then cosine decay to 0 at `steps` (0 after)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`learning_rate` as a LambdaLR factor of the optimizer's lr: warm-up over `warmup_frac`
    of `total_steps` (at least one step), cosine decay to 0 at `total_steps`."""
    warmup = max(1, round(warmup_frac * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, total_steps, 1.0, warmup))


def train_draft(recording: Recording, config: DraftConfig, train: TrainConfig, seed: int = 0,
                device: str | torch.device = 'cpu', progress: bool = True,
                ) -> tuple[DraftModel, dict]:
    """Train a fresh draft (projection included) on a recording; return it and its metrics."""
    torch.manual_seed(seed)
    model = DraftModel(config).to(device)
    train_idx, held_idx = split_by_source(recording.source, train.held_out_frac, seed)
    h0, tokens = recording.h0.to(device), recording.tokens.to(device)
    h0_train, tokens_train = h0[train_idx], tokens[train_idx]
    h0_held, tokens_held = h0[held_idx], tokens[held_idx]
    weights = layer_weights(config.num_proposals, train.layer_decay).to(device)
    untrained = evaluate(model, h0_held, tokens_held, weights, train.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr,
                                  weight_decay=train.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / train.batch_size)
    scheduler = cosine_schedule(optimizer, train.epochs * steps_per_epoch, train.warmup_frac)
    generator = torch.Generator().manual_seed(seed)
    best = {'loss': math.inf}
    best_state, best_epoch, history = None, 0, []
    bar = tqdm(range(1, train.epochs + 1), desc='training draft', unit='epoch',
               disable=not progress)
    for epoch in bar:
        model.train()
        total = 0.0
        for batch in torch.randperm(len(train_idx), generator=generator).split(train.batch_size):
            batch = batch.to(device)
            logits = model(h0_train[batch])  # [b, K, C, V]
            loss = (weights * per_layer_loss(logits, tokens_train[batch],
                                             train.label_smoothing)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        held = evaluate(model, h0_held, tokens_held, weights, train.label_smoothing)
        history.append({'epoch': epoch, 'train_loss': total / len(train_idx),
                        'held_out_loss': held['loss'], 'held_out_exact': held['exact_match']})
        bar.set_postfix(train=f'{total / len(train_idx):.3f}', held=f'{held["loss"]:.3f}',
                        acc=f'{held["token_accuracy"][0]:.3f}')
        if held['loss'] < best['loss'] - 1e-4:
            best, best_epoch = held, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= train.patience:
            logger.info('early stop at epoch %d: held-out loss last improved at epoch %d',
                        epoch, best_epoch)
            break
    bar.close()
    if best_state is None:
        raise RuntimeError(f'draft training diverged: held-out loss {held["loss"]} never '
                           'improved on inf (try a lower learning rate)')
    model.load_state_dict(best_state)
    model.eval()
    metrics = {
        'held_out': best,
        'train': evaluate(model, h0_train, tokens_train, weights, train.label_smoothing),
        'untrained_held_out': untrained,
        'constant_guess_held_out': mode_baseline(tokens_train, tokens_held, config.levels),
        'best_epoch': best_epoch,
        'epochs_run': len(history),
        'history': history,
        'train_samples': len(train_idx),
        'held_out_samples': len(held_idx),
        'held_out_sources': int(recording.source[held_idx].unique().numel()),
    }
    return model, metrics


def margin_summary(margins: torch.Tensor) -> dict:
    """How decided the main's own greedy codes are (top-1 minus top-2 logit), per layer."""
    flat = margins.transpose(0, 1).flatten(1)  # [K, N*C]
    return {'median': flat.median(-1).values.tolist(),
            'fraction_below_0.1': (flat < 0.1).float().mean(-1).tolist()}


# ---------------------------------------------------------------- entry points

def distill_draft(main_dir: str | Path, observations_dir: str | Path, out_dir: str | Path,
                  num_proposals: int = 3, samples: int = 1024, epochs: int | None = None,
                  seed: int = 0,
                  progress: bool = True, augment_images: bool = True,
                  device: str = 'cpu', strict: bool = False,
                  train: TrainConfig | None = None, draft_sizes: dict | None = None) -> dict:
    """Distil a draft for the main bundle at main_dir and save it to out_dir; return metrics.

    samples: number of (augmented) samples recorded, cycling over the source images (copy 0 of
    each image is unaugmented). epochs: overrides train.epochs when given. strict: refuse malformed
    observations instead of skipping them, and refuse to save a draft whose held-out loss is
    not below its untrained initialisation's. draft_sizes: DraftConfig overrides (d_model, ffn,
    n_heads, head_hidden) for small test drafts; the default is the reference architecture.
    """
    train = train or TrainConfig()
    train = train if epochs is None else replace(train, epochs=epochs)
    if not 1 <= num_proposals <= MAX_PROPOSALS:
        raise ValueError(f'num_proposals (K) must be in 1..{MAX_PROPOSALS}, got {num_proposals}')
    if samples < 2 or train.epochs < 1:
        raise ValueError(f'need samples >= 2 and epochs >= 1, got {samples} and {train.epochs}')
    started = time.perf_counter()
    observations = read_observations(observations_dir, strict=strict)
    main = MainModel.from_dir(main_dir, device=device, dtype=torch.float32)
    main.eval()
    plan = sample_plan(len(observations), samples, augment_images)
    recording = record(main, observations, plan, num_proposals, seed, progress=progress)
    record_s = time.perf_counter() - started
    config = DraftConfig(hidden_size=main.hidden_size, num_proposals=num_proposals,
                         codes_per_layer=main.codes_per_layer, levels=main.levels,
                         dropout=train.dropout, **(draft_sizes or {}))
    model, metrics = train_draft(recording, config, train, seed=seed, device=device,
                                 progress=progress)
    metrics.update(record_seconds=record_s,
                   train_seconds=time.perf_counter() - started - record_s,
                   main_margins=margin_summary(recording.margins))
    if strict and not metrics['held_out']['loss'] < metrics['untrained_held_out']['loss']:
        raise RuntimeError(f'distilled draft is no better than untrained on held-out data '
                           f'(loss {metrics["held_out"]["loss"]:.4f} vs '
                           f'{metrics["untrained_held_out"]["loss"]:.4f}); not saved')
    model.cpu().float().save(out_dir, {
        'main_weights_sha256': main.weights_hash,
        'trained': True,
        'metrics': {k: v for k, v in metrics.items() if k != 'history'},
        'data': {'observations': str(Path(observations_dir).resolve()),
                 'source_images': len(observations), 'samples': len(plan),
                 'augmented': augment_images,
                 'instructions': len({o.instruction for o in observations}),
                 'suites': sorted({str(o.meta.get('suite')) for o in observations}),
                 'seed': seed},
        'training': asdict(train),
    })
    logger.info('draft saved to %s: %s', out_dir, summary_line(metrics))
    return metrics


def summary_line(metrics: dict) -> str:
    """Held-out token accuracy and exact-layer match per proposal layer, and mean accepted
    layers, of distillation metrics as one line."""
    held = metrics['held_out']
    return ('held-out token accuracy ' + ' '.join(f'{a:.3f}' for a in held['token_accuracy'])
            + ', exact-layer match ' + ' '.join(f'{a:.3f}' for a in held['exact_match'])
            + f', mean accepted layers {held["mean_accepted_layers"]:.2f}')


def format_report(metrics: dict) -> str:
    """A table of held-out metrics per proposal layer: trained, untrained, constant guess."""
    rows = [('trained', metrics['held_out']), ('untrained', metrics['untrained_held_out']),
            ('constant guess', metrics['constant_guess_held_out'])]
    k = len(metrics['held_out']['token_accuracy'])
    header = f'{"held-out (" + str(metrics["held_out_samples"]) + ")":<22}' + ''.join(
        f'{"layer " + str(i + 1) + " acc/exact":>22}' for i in range(k)) + f'{"mean accepted":>15}'
    lines = [header]
    for name, values in rows:
        cells = ''.join(f'{a:>13.3f} / {e:<6.3f}' for a, e in
                        zip(values['token_accuracy'], values['exact_match'], strict=True))
        lines.append(f'{name:<22}{cells}{values["mean_accepted_layers"]:>15.2f}')
    margins = metrics['main_margins']
    lines.append('main top-1 minus top-2 logit, median per layer: '
                 + ' '.join(f'{m:.3f}' for m in margins['median'])
                 + '; codes with margin < 0.1: '
                 + ' '.join(f'{f:.3f}' for f in margins['fraction_below_0.1']))
    lines.append(f'epochs {metrics["epochs_run"]} (best {metrics["best_epoch"]}), recording '
                 f'{metrics["record_seconds"]:.1f} s, training {metrics["train_seconds"]:.1f} s')
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd train-draft` options."""
    parser.add_argument('--model', default=None,
                        help='main model bundle directory (default: the default bundle)')
    parser.add_argument('--observations', required=True,
                        help='observation directory (index.jsonl + images/)')
    parser.add_argument('--out', default=None, help='draft output directory (default: '
                        '<model>/draft)')
    parser.add_argument('--num-proposals', type=int, default=3,
                        help='K, layers the draft proposes (1..6)')
    parser.add_argument('--samples', type=int, default=1024,
                        help='samples to record, cycling over the images with augmentation')
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                        help='augment images (random resized crop, colour jitter, rotation)')
    parser.add_argument('--epochs', type=int, default=40, help='maximum training epochs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--strict', action='store_true',
                        help='stop on a malformed observation instead of skipping it, and '
                             'refuse to save a draft no better than untrained on held-out data')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')


def run(args: argparse.Namespace) -> int:
    """`rsd train-draft`: distil and save the draft, print the report; exit 1 on failure."""
    from rsd_core.bundle import default_bundle_dir

    model_dir = Path(args.model) if args.model else default_bundle_dir()
    out_dir = Path(args.out) if args.out else model_dir / 'draft'
    try:
        metrics = distill_draft(model_dir, args.observations, out_dir,
                                num_proposals=args.num_proposals, samples=args.samples,
                                epochs=args.epochs, seed=args.seed, augment_images=args.augment,
                                device=args.device, strict=args.strict)
    except (ValueError, RuntimeError) as exc:
        logger.error('%s', exc)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0
