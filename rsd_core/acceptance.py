"""Acceptance rules of the speculative step, and near-tie accounting.

Shapes: B batch, k proposed layers, C = 128 codes per layer, V = 7 levels, T chunk steps,
A action dims. A layer passes only if it passes for every batch element (the KV cache is
shared across the batch, so the accepted prefix must be too).

- exact: a layer passes when all C draft codes equal the main's argmax. The decoded chunk is
  then the one main-only greedy decoding gives.
- tolerance: a layer passes when decoding with the draft's layer instead of the main's (after
  the prefix accepted so far) changes no action value by more than a per-dimension tolerance,
  in action units. The largest deviation actually accepted is reported. Per swapped layer:
  the later layers the main decides after a swapped one are not bounded against main-only.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Values of the `acceptance` setting: the two rules for draft layers above, and 'bounded'
# (certified residual depth, rsd_core.certificate; draft layers there are verified exactly).
MODES = ('exact', 'tolerance', 'bounded')

# Relative top-2 logit gap below which a code counts as a near tie: a multi-position forward
# and single-position steps sum in different orders and can differ by ~100 ulp of the logit
# scale, enough to flip the argmax of such a code.
NEAR_TIE_RELATIVE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

# decode(codes [B, l, C] long) -> actions [B, T, A] in action units, from the first l layers.
Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Verdict:
    """Outcome of comparing k proposed layers with the main's choice for the same layers."""

    accepted: int                   # length of the accepted prefix, 0..k
    passed: list[bool]              # per depth 1..k: accepted (False from the first rejection)
    max_deviation: float = 0.0      # action units; largest |change| accepted (tolerance mode)


def near_tie_threshold(dtype: torch.dtype) -> float:
    """Relative top-2 gap under which a code of a `dtype` forward counts as a near tie."""
    if dtype not in NEAR_TIE_RELATIVE:
        raise ValueError(f'no near-tie threshold for dtype {dtype}; expected one of '
                         f'{sorted(str(d) for d in NEAR_TIE_RELATIVE)}')
    return NEAR_TIE_RELATIVE[dtype]


def near_ties(logits: torch.Tensor) -> int:
    """Codes whose top-2 logits are closer than the dtype's threshold.

    logits: [..., V]; the gap is compared with `relative * max(1, |top1|)`.
    """
    top2 = logits.topk(2, dim=-1).values                        # [..., 2]
    gap = top2[..., 0] - top2[..., 1]                           # [...]
    scale = top2[..., 0].abs().clamp_min(1.0)
    return int((gap < near_tie_threshold(logits.dtype) * scale).sum())


def _verdict(passes: list[bool]) -> Verdict:
    accepted = 0
    while accepted < len(passes) and passes[accepted]:
        accepted += 1
    return Verdict(accepted, [d < accepted for d in range(len(passes))])


def accept_exact(proposals: torch.Tensor, main_codes: torch.Tensor) -> Verdict:
    """Accept the longest prefix of layers whose codes all equal the main's argmax.

    proposals, main_codes: [B, k, C] long.
    """
    passes = (proposals == main_codes).all(dim=-1).all(dim=0)   # [k]
    return _verdict(passes.tolist())


def layer_deviation(decode: Decoder, prefix: torch.Tensor, proposal: torch.Tensor,
                    main_layer: torch.Tensor) -> torch.Tensor:
    """|actions decoded with the proposal - actions decoded with the main's layer|.

    prefix: [B, l, C] accepted layers; proposal, main_layer: [B, C].
    Returns [B, T, A] in action units.
    """
    batch = prefix.shape[0]
    candidates = torch.stack([proposal, main_layer])                      # [2, B, C]
    codes = torch.cat([prefix.repeat(2, 1, 1), candidates.flatten(0, 1)[:, None]], dim=1)
    actions = decode(codes)                                               # [2B, T, A]
    return (actions[:batch] - actions[batch:]).abs()


def accept_tolerance(decode: Decoder, prefix: torch.Tensor, proposals: torch.Tensor,
                     main_codes: torch.Tensor, tolerance: torch.Tensor) -> Verdict:
    """Accept layers in order while swapping in the draft's layer moves no action value by
    more than `tolerance`.

    prefix: [B, l, C] layers already fixed (layer 0); proposals, main_codes: [B, k, C];
    tolerance: [A] action units. main_codes[:, d] is the main's choice given the prefix
    extended by proposals[:, :d], which is exactly the prefix tested at depth d.
    """
    passes = []
    max_deviation = 0.0
    for depth in range(proposals.shape[1]):
        proposal, main_layer = proposals[:, depth], main_codes[:, depth]  # [B, C]
        if bool((proposal == main_layer).all()):
            deviation = 0.0
        else:
            error = layer_deviation(decode, prefix, proposal, main_layer)  # [B, T, A]
            if not bool((error <= tolerance).all()):
                break
            deviation = float(error.max())
        passes.append(True)
        max_deviation = max(max_deviation, deviation)
        prefix = torch.cat([prefix, proposal[:, None]], dim=1)            # [B, l+1, C]
    verdict = _verdict(passes + [False] * (proposals.shape[1] - len(passes)))
    verdict.max_deviation = max_deviation
    return verdict
