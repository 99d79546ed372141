"""Training a draft on a recording of the main's greedy tokens, and the draft's metrics.

The whole draft (input projection + decoder layer + heads) is trained with cross-entropy on the
main's tokens of layers 1..K, weighted per proposal (early layers gate the acceptance of later
ones: the prefix rule), with label smoothing; the held-out split is by source image (augmented
copies never straddle it) and training stops early on held-out loss. Metrics are per proposal
layer: token accuracy, exact-layer match (all C codes equal, what exact acceptance needs) and
the expected accepted prefix length, next to the untrained draft and the constant guess.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
import logging
import math

import torch
from tqdm import tqdm

from rsd_core.draft import DraftConfig, DraftModel
from rsd_core.training.objective import layer_cross_entropy, most_frequent_codes, token_accuracy
from rsd_core.training.schedule import warmup_cosine

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of the draft distillation; `rsd train-draft`'s training flags are
    generated from these fields (rsd_core.config_flags)."""

    epochs: int = field(default=40, metadata={'help': 'maximum training epochs'})
    batch_size: int = field(default=64, metadata={'help': 'samples per step'})
    lr: float = field(default=1e-3, metadata={'help': 'peak learning rate'})
    weight_decay: float = field(default=0.01, metadata={'help': 'AdamW weight decay'})
    warmup_frac: float = field(default=0.05, metadata={'help': 'fraction of steps warming up'})
    label_smoothing: float = field(default=0.05, metadata={'help': 'cross-entropy smoothing'})
    layer_decay: float = field(default=0.8, metadata={
        'help': 'loss weight of proposal k is layer_decay**k (early layers gate the acceptance '
                'of later ones: prefix rule)'})
    dropout: float = field(default=0.0, metadata={'help': 'dropout in the draft'})
    held_out_frac: float = field(default=0.2, metadata={'help': 'fraction of source images '
                                                                'held out'})
    patience: int = field(default=8, metadata={
        'help': 'epochs without held-out loss improvement before stopping'})
    grad_clip: float = field(default=1.0, metadata={'help': 'gradient norm clip'})


@dataclass
class Recording:
    """What the draft learns from. N samples, K proposals."""

    h0: torch.Tensor        # [N, H] float32, the main's prompt hidden state
    tokens: torch.Tensor    # [N, K, C] long, the main's greedy codes for layers 1..K
    margins: torch.Tensor   # [N, K, C] float32, the main's top-1 minus top-2 logit
    source: torch.Tensor    # [N] long, index of the source observation (for the split)


def split_by_source(source: torch.Tensor, held_out_frac: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (train, held-out); all copies of one source image land on one side."""
    sources = source.unique()
    generator = torch.Generator().manual_seed(seed)
    shuffled = sources[torch.randperm(len(sources), generator=generator)]
    n_held = min(len(sources) - 1, max(1, round(held_out_frac * len(sources))))
    held = torch.isin(source, shuffled[:n_held])
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def layer_weights(num_proposals: int, decay: float) -> torch.Tensor:
    """[K] loss weights summing to 1."""
    weights = decay ** torch.arange(num_proposals, dtype=torch.float32)
    return weights / weights.sum()


def acceptance_metrics(predicted: torch.Tensor, tokens: torch.Tensor) -> dict:
    """predicted, tokens [N, K, C] -> per-layer token accuracy, exact-layer match, prefix rates.

    prefix_accept[k] = fraction of samples whose layers 1..k+1 all match exactly (what the exact
    rule accepts); mean_accepted_layers = their sum, the expected accepted proposals per chunk.
    """
    correct = predicted == tokens  # [N, K, C]
    exact = correct.all(-1)  # [N, K]
    prefix = exact.cumprod(-1).float().mean(0)  # [K]
    return {'token_accuracy': token_accuracy(predicted, tokens).tolist(),
            'exact_match': exact.float().mean(0).tolist(),
            'prefix_accept': prefix.tolist(),
            'mean_accepted_layers': float(prefix.sum())}


@torch.no_grad()
def evaluate_draft(model: DraftModel, h0: torch.Tensor, tokens: torch.Tensor,
                   weights: torch.Tensor, label_smoothing: float = 0.0,
                   batch_size: int = 256) -> dict:
    """loss: the training objective (weighted, smoothed CE); layer_ce: plain CE per layer
    [K]; plus acceptance_metrics."""
    model.eval()
    smoothed, plain, predicted = [], [], []
    for start in range(0, len(h0), batch_size):
        logits = model(h0[start:start + batch_size])  # [b, K, C, V]
        target = tokens[start:start + batch_size]
        smoothed.append(layer_cross_entropy(logits, target, label_smoothing) * len(logits))
        plain.append(layer_cross_entropy(logits, target) * len(logits))
        predicted.append(logits.argmax(-1))
    layer_loss = torch.stack(smoothed).sum(0) / len(h0)  # [K]
    return {'loss': float((weights.to(layer_loss) * layer_loss).sum()),
            'layer_ce': (torch.stack(plain).sum(0) / len(h0)).tolist(),
            **acceptance_metrics(torch.cat(predicted), tokens)}


def constant_guess_metrics(train_tokens: torch.Tensor, held_tokens: torch.Tensor,
                           levels: int) -> dict:
    """Acceptance of a constant guess: the most frequent training code at every position.
    train_tokens [N, K, C], held_tokens [M, K, C]."""
    guess = most_frequent_codes(train_tokens, levels).expand_as(held_tokens)  # [M, K, C]
    return acceptance_metrics(guess, held_tokens)


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
    untrained = evaluate_draft(model, h0_held, tokens_held, weights, train.label_smoothing)
    best, best_epoch, history = fit_with_early_stopping(
        model, len(train_idx),
        lambda batch: (weights * layer_cross_entropy(model(h0_train[batch]),     # [b, K, C, V]
                                                     tokens_train[batch],
                                                     train.label_smoothing)).sum(),
        lambda: evaluate_draft(model, h0_held, tokens_held, weights, train.label_smoothing),
        train, seed, device, 'training draft', progress)
    metrics = {
        'held_out': best,
        'train': evaluate_draft(model, h0_train, tokens_train, weights, train.label_smoothing),
        'untrained_held_out': untrained,
        'constant_guess_held_out': constant_guess_metrics(tokens_train, tokens_held,
                                                          config.levels),
        'best_epoch': best_epoch,
        'epochs_run': len(history),
        'history': history,
        'train_samples': len(train_idx),
        'held_out_samples': len(held_idx),
        'held_out_sources': int(recording.source[held_idx].unique().numel()),
    }
    return model, metrics


def fit_with_early_stopping(model: torch.nn.Module, num_train: int,
                            batch_loss: Callable[[torch.Tensor], torch.Tensor],
                            held_out: Callable[[], dict], train: TrainConfig, seed: int,
                            device: str | torch.device, desc: str,
                            progress: bool) -> tuple[dict, int, list[dict]]:
    """The epochs of a draft's training: AdamW with warm-up + cosine over shuffled batches of
    the `num_train` training samples (`batch_loss(indices [b])` -> scalar loss), the held-out
    metrics (`held_out()`, with 'loss', 'exact_match', 'token_accuracy') after each epoch, the
    weights of the best held-out loss kept, and a stop after `train.patience` epochs without
    improvement. Returns (best held-out metrics, best epoch, per-epoch history); `model` ends
    with the best weights, in eval mode. RuntimeError if the held-out loss never improved."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr,
                                  weight_decay=train.weight_decay)
    total_steps = train.epochs * math.ceil(num_train / train.batch_size)
    scheduler = warmup_cosine(optimizer, total_steps,
                              max(1, round(train.warmup_frac * total_steps)))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, history = {'loss': math.inf}, None, 0, []
    bar = tqdm(range(1, train.epochs + 1), desc=desc, unit='epoch', disable=not progress)
    for epoch in bar:
        model.train()
        total = 0.0
        for batch in torch.randperm(num_train, generator=generator).split(train.batch_size):
            batch = batch.to(device)
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        held = held_out()
        history.append({'epoch': epoch, 'train_loss': total / num_train,
                        'held_out_loss': held['loss'], 'held_out_exact': held['exact_match']})
        bar.set_postfix(train=f'{total / num_train:.3f}', held=f'{held["loss"]:.3f}',
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
        raise RuntimeError(f'{desc}: diverged, held-out loss {held["loss"]} never improved on '
                           'inf (try a lower learning rate)')
    model.load_state_dict(best_state)
    model.eval()
    return best, best_epoch, history


def draft_summary_line(metrics: dict) -> str:
    """Held-out token accuracy and exact-layer match per proposal layer, and mean accepted
    layers, of distillation metrics as one line."""
    held = metrics['held_out']
    return ('held-out token accuracy ' + ' '.join(f'{a:.3f}' for a in held['token_accuracy'])
            + ', exact-layer match ' + ' '.join(f'{a:.3f}' for a in held['exact_match'])
            + f', mean accepted layers {held["mean_accepted_layers"]:.2f}')
