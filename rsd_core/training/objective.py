"""What the policy and the draft are trained on and measured against, per residual layer.

Both predict codes of residual layers ([B, L, C] for the policy, [B, K, C] for the draft's K
proposals): the loss is cross-entropy per layer, the measure token accuracy per layer, and the
reference point the constant guess (each position's most frequent training code), which a
model must beat to show it reads its input.
"""

import torch
import torch.nn.functional as F


def layer_cross_entropy(logits: torch.Tensor, codes: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, L, C, V], codes [B, L, C] long -> mean cross-entropy per layer [L] (float32)."""
    loss = F.cross_entropy(logits.flatten(0, 2).float(), codes.flatten(),
                           reduction='none', label_smoothing=label_smoothing)  # [B*L*C]
    return loss.view(codes.shape).mean(dim=(0, 2))


def token_accuracy(predicted: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """predicted, codes [N, L, C] -> fraction of codes right per layer [L]."""
    return (predicted == codes).float().mean(dim=(0, 2))


def most_frequent_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """The constant guess: codes [N, L, C] long (levels 0..V-1) -> each position's most
    frequent value [L, C]."""
    return F.one_hot(codes, levels).sum(0).argmax(-1)  # [L, C, V] counts -> [L, C]
