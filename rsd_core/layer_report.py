"""Per-layer truth about a model: where decoding time goes and whether a draft can pay.

For every residual layer of main-only greedy decoding, over a set of inputs:
- how decided the main is: mean top-1 probability over the V levels, median top-2 logit gap;
- what the layer is worth: the measured max |change| of any action value if decoding stopped
  before it (after `layer` layers), the certified bound on that change over every code of the
  layers not decoded (`ActionTokenizer.truncation_bound`), and a witness (actual codes that
  reach a change that large, a lower bound on the worst case);
- for the layers a draft proposes: its per-code agreement with the main's codes and how often a
  whole layer matches (what exact acceptance needs).
Depth m in the certificate columns means "the first m layers decoded".
"""

import numpy as np
import torch

from rsd_core.engine import RSDEngine
from rsd_core.tokenizer import codes_to_tokens

Input = tuple[np.ndarray, str, np.ndarray | None]


def _median(values: list[float]) -> float:
    return float(np.median(values))


@torch.inference_mode()
def layer_report(engine: RSDEngine, inputs: list[Input]) -> list[dict]:
    """One dict per layer l = 0..L-1 (see the module docstring); action units, probabilities
    in [0, 1]. Keys: layer, top1_prob_mean, top2_gap_median, truncation_change_median /
    _max (stopping after `layer` layers, None for layer 0), certified_bound_median / _max and
    witness_max (depth = layer), draft_code_agreement and draft_layer_match (None where the
    draft proposes nothing)."""
    tokenizer, draft = engine.tokenizer, engine.draft
    num_layers, latent_dim = engine.main.num_layers, tokenizer.config.latent_dim
    top1, gaps = [[] for _ in range(num_layers)], [[] for _ in range(num_layers)]
    change, bound, witness = ([[] for _ in range(num_layers)] for _ in range(3))
    agreement, match = [[] for _ in range(num_layers)], [[] for _ in range(num_layers)]
    for image, instruction, proprio in inputs:
        h0, codes, logits = engine.trace(image, instruction, proprio)   # [H], [L, C], [L, C, V]
        top2 = logits.float().topk(2, dim=-1).values                     # [L, C, 2]
        probs = logits.float().softmax(-1).amax(-1)                      # [L, C]
        tokens = codes_to_tokens(codes[None], latent_dim)                # [1, L, T, D]
        full = tokenizer.decode(tokens)                                  # [1, T, A]
        for layer in range(num_layers):
            top1[layer].append(float(probs[layer].mean()))
            gaps[layer] += (top2[layer, :, 0] - top2[layer, :, 1]).tolist()
            if layer:
                change[layer].append(float((full - tokenizer.decode(tokens, layer)).abs().max()))
                bound[layer].append(float(tokenizer.truncation_bound(tokens, layer).max()))
                witness[layer].append(float(tokenizer.truncation_witness(tokens, layer).max()))
        if draft is not None:
            proposed = draft(h0[None].to(next(draft.parameters()).dtype)).argmax(-1)[0]
            for depth, guess in enumerate(proposed, start=1):            # guess: [C]
                agreement[depth].append(float((guess == codes[depth]).float().mean()))
                match[depth].append(float(bool((guess == codes[depth]).all())))
    return [{
        'layer': layer,
        'top1_prob_mean': float(np.mean(top1[layer])),
        'top2_gap_median': _median(gaps[layer]),
        'truncation_change_median': _median(change[layer]) if layer else None,
        'truncation_change_max': max(change[layer]) if layer else None,
        'certified_bound_median': _median(bound[layer]) if layer else None,
        'certified_bound_max': max(bound[layer]) if layer else None,
        'witness_max': max(witness[layer]) if layer else None,
        'draft_code_agreement': float(np.mean(agreement[layer])) if agreement[layer] else None,
        'draft_layer_match': float(np.mean(match[layer])) if match[layer] else None,
    } for layer in range(num_layers)]


def _cell(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_layer_report(rows: list[dict]) -> str:
    """The per-layer report as a text table (action units)."""
    lines = ['per layer (main-only greedy; "stop" = decoding only the layers before this one):',
             f"{'layer':>5}{'top-1 p':>9}{'top-2 gap':>11}{'stop: change p50':>18}"
             f"{'max':>9}{'certified p50':>15}{'max':>9}{'witness':>9}{'draft codes':>13}"
             f"{'whole':>7}"]
    for r in rows:
        lines.append(
            f"{r['layer']:>5}{r['top1_prob_mean']:>9.2f}{r['top2_gap_median']:>11.3f}"
            f"{_cell(r['truncation_change_median'], '.5f'):>18}"
            f"{_cell(r['truncation_change_max'], '.5f'):>9}"
            f"{_cell(r['certified_bound_median'], '.5f'):>15}"
            f"{_cell(r['certified_bound_max'], '.5f'):>9}{_cell(r['witness_max'], '.5f'):>9}"
            f"{_cell(r['draft_code_agreement'], '.2f'):>13}"
            f"{_cell(r['draft_layer_match'], '.2f'):>7}")
    return '\n'.join(lines)
