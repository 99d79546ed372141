"""Training a v2 (feature) draft on the main's greedy trajectories, and its metrics.

The recording holds, per sample, the main's greedy codes of every layer [L, C] and the hidden
state that chose each [L, H] (`rsd_core.engine.greedy_features`). One training step rolls the
draft from EVERY start layer l = 0..L-2 (the engine starts a roll after each verification) for
k = min(K, L-1-l) steps, on its own predicted features (training-time test: what it will see
at run time), embedding the main's codes (under the prefix rule a later proposal only counts
when the earlier ones equal the main's). Before training the draft's standardisation is set
from the training split's features and code embeddings (`FeatureDraft.set_statistics`). Loss
per step (weighted layer_decay**step): the mean squared error of the predicted next hidden
state against the main's, in the draft's standardised units, plus CODE_WEIGHT x the
cross-entropy of the main's frozen head on it against the main's codes (smoothed), EAGLE's
regression + 0.1 classification. Split by source image, early stopping on held-out loss.
Metrics (same keys as v1's, `draft_training`) are those of the roll from layer 0, what the
first verification of a chunk tests; `from_layer` adds the next-layer accuracy and exact match
of a one-step roll from every start layer.
"""

from dataclasses import dataclass
import logging

import torch
import torch.nn.functional as F

from rsd_core.draft_v2 import FeatureDraft, FeatureDraftConfig
from rsd_core.training.draft_training import (
    TrainConfig,
    acceptance_metrics,
    constant_guess_metrics,
    fit_with_early_stopping,
    layer_weights,
    split_by_source,
)
from rsd_core.training.objective import layer_cross_entropy

logger = logging.getLogger(__name__)

# Weight of the codes' cross-entropy next to the feature regression (weight 1). The regression
# carries the learning: on the tiny test main (top-1 probability 0.27, so its codes are hard
# labels of a flat softmax) the cross-entropy alone kept held-out next-layer code agreement at
# or below the constant guess's 0.92-0.96 (0.84-0.89 standardised, 0.92-0.96 with
# LayerNorms); the regression reaches 0.98-0.99, with or without 0.1 of cross-entropy.
CODE_WEIGHT = 0.1


@dataclass
class FeatureRecording:
    """What a v2 draft learns from. N samples, L layers."""

    features: torch.Tensor  # [N, L, H] float32, the main's hidden state that chose each layer
    codes: torch.Tensor     # [N, L, C] long, the main's greedy codes
    margins: torch.Tensor   # [N, L, C] float32, the main's top-1 minus top-2 logit
    source: torch.Tensor    # [N] long, index of the source observation (for the split)


@torch.no_grad()
def code_embeddings(main: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """The main's embedding e_l = main.layer_embedding(codes_l, l) of every layer: codes
    [N, L, C] -> [N, L, H] float32 (the draft's standardisation inputs)."""
    return torch.stack([main.layer_embedding(codes[:, layer:layer + 1], layer)[:, 0]
                        for layer in range(codes.shape[1])], 1).float()          # [N, L, H]


def roll_loss(model: FeatureDraft, features: torch.Tensor, codes: torch.Tensor, start: int,
              weights: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Training loss of the rolls from layer `start`: features [b, L, H], codes [b, L, C]."""
    k = min(model.num_proposals, codes.shape[1] - 1 - start)
    target = codes[:, start + 1:start + 1 + k]                                  # [b, k, C]
    logits, predicted = model.roll(features[:, start], codes[:, start], start, k,
                                   teacher=target)                              # [b, k, ...]
    ce = layer_cross_entropy(logits, target, smoothing)                         # [k]
    z = model.standardised(predicted, start + 1)                                # [b, k, H]
    z_true = model.standardised(features[:, start + 1:start + 1 + k], start + 1)
    feature = F.mse_loss(z, z_true, reduction='none').mean(dim=(0, 2))          # [k]
    step = weights[:k] / weights[:k].sum()
    return (step * (feature + CODE_WEIGHT * ce)).sum()


@torch.no_grad()
def evaluate_feature_draft(model: FeatureDraft, features: torch.Tensor, codes: torch.Tensor,
                           weights: torch.Tensor, smoothing: float = 0.0,
                           batch_size: int = 256) -> dict:
    """loss: the training objective over every start layer; then, for the roll from layer 0
    (proposals for layers 1..K on the draft's own codes, as the engine runs it): layer_ce and
    acceptance_metrics; from_layer: one-step next-layer token accuracy / exact match per start
    layer 0..L-2."""
    model.eval()
    starts = range(codes.shape[1] - 1)
    loss, plain, predicted, next_codes = 0.0, [], [], []
    for begin in range(0, len(codes), batch_size):
        f, c = features[begin:begin + batch_size], codes[begin:begin + batch_size]
        loss += sum(float(roll_loss(model, f, c, s, weights, smoothing)) for s in starts) \
            / len(starts) * len(c)
        logits = model.proposal_logits(f[:, 0], c[:, 0], 0, model.num_proposals)
        plain.append(layer_cross_entropy(logits, c[:, 1:1 + model.num_proposals]) * len(c))
        predicted.append(logits.argmax(-1))
        next_codes.append(torch.stack([model.proposal_logits(f[:, s], c[:, s], s, 1)[:, 0]
                                       .argmax(-1) for s in starts], 1))        # [b, L-1, C]
    tokens = codes[:, 1:1 + model.num_proposals]
    nxt = acceptance_metrics(torch.cat(next_codes), codes[:, 1:])
    return {'loss': loss / len(codes),
            'layer_ce': (torch.stack(plain).sum(0) / len(codes)).tolist(),
            **acceptance_metrics(torch.cat(predicted), tokens),
            'from_layer': {'token_accuracy': nxt['token_accuracy'],
                           'exact_match': nxt['exact_match']}}


def train_feature_draft(recording: FeatureRecording, main: torch.nn.Module,
                        config: FeatureDraftConfig, train: TrainConfig, seed: int = 0,
                        device: str | torch.device = 'cpu', progress: bool = True,
                        ) -> tuple[FeatureDraft, dict]:
    """Train a fresh v2 draft bound to `main` (frozen) on a recording; return it and metrics
    shaped like `draft_training.train_draft`'s."""
    torch.manual_seed(seed)
    model = FeatureDraft(config).to(device).bind(main)
    train_idx, held_idx = split_by_source(recording.source, train.held_out_frac, seed)
    features, codes = recording.features.to(device), recording.codes.to(device)
    f_train, c_train = features[train_idx], codes[train_idx]
    model.set_statistics(f_train, code_embeddings(main, c_train))
    f_held, c_held = features[held_idx], codes[held_idx]
    weights = layer_weights(config.num_proposals, train.layer_decay).to(device)
    smoothing = train.label_smoothing
    untrained = evaluate_feature_draft(model, f_held, c_held, weights, smoothing)
    starts = range(config.num_layers - 1)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        f, c = f_train[batch], c_train[batch]
        return sum(roll_loss(model, f, c, s, weights, smoothing) for s in starts) / len(starts)

    best, best_epoch, history = fit_with_early_stopping(
        model, len(train_idx), batch_loss,
        lambda: evaluate_feature_draft(model, f_held, c_held, weights, smoothing),
        train, seed, device, 'training v2 draft', progress)
    k = config.num_proposals
    metrics = {
        'held_out': best,
        'train': evaluate_feature_draft(model, f_train, c_train, weights, smoothing),
        'untrained_held_out': untrained,
        'constant_guess_held_out': constant_guess_metrics(
            c_train[:, 1:1 + k], c_held[:, 1:1 + k], config.levels),
        'best_epoch': best_epoch, 'epochs_run': len(history), 'history': history,
        'train_samples': len(train_idx), 'held_out_samples': len(held_idx),
        'held_out_sources': int(recording.source[held_idx].unique().numel()),
    }
    return model, metrics
