"""Certified residual depth: the certificate holds against every code we can throw at it.

The bound of `ActionTokenizer.truncation_bound` must cover |decode(all L layers) -
decode(first m)| for EVERY code of layers m..L-1. Checked on tokenizers with random weights
(decoder MLP seeing every layer, and a coarse-layer decoder), on many random prefixes, against
random codes, coordinate-wise extreme codes (every skipped code at 0 or V-1) in random and in
adversarial sign patterns (the sign of each row of the decoder's Jacobian at the prefix, found
by autograd here, not by the code under test), all in float64.
"""

import math

import numpy as np
import pytest
import torch

from rsd_core.certificate import gelu_slope, gelu_slope_range
from rsd_core.normalization import ActionNormalizer
from rsd_core.tokenizer import ActionTokenizer, TokenizerConfig

LEVELS = 7


def random_tokenizer(coarse_layers: int, seed: int = 0) -> ActionTokenizer:
    """A float64 tokenizer with random weights, scales near V**-l and a non-trivial normaliser
    (gains 0.5..2 and one constant dimension)."""
    torch.manual_seed(seed)
    normalizer = ActionNormalizer('quantile', {
        'low': -torch.linspace(0.5, 2.0, 7), 'high': torch.linspace(0.5, 2.0, 7)})
    normalizer.get_buffer('high')[3] = normalizer.get_buffer('low')[3]       # constant dim
    tokenizer = ActionTokenizer(TokenizerConfig(hidden_size=64, coarse_layers=coarse_layers),
                                normalizer)
    with torch.no_grad():
        tokenizer.rfsq.log_scales.add_(0.3 * torch.randn(8))
        for module in tokenizer.decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3.0)                                     # a curved MLP
    return tokenizer.double().eval()


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, LEVELS, (n, 8, 8, 16), generator=torch.Generator().manual_seed(seed))


def jacobian_signs(tokenizer: ActionTokenizer, tokens: torch.Tensor, depth: int,
                   rows: list[int]) -> torch.Tensor:
    """Signs [len(rows), C] of d output_row / d latent at the prefix of `tokens` (autograd)."""
    z, u = tokenizer.decoder_inputs(tokens[:1], depth)
    z = z.clone().requires_grad_(True)

    def output(latent):
        coarse = None if u is None else u + (latent - z.detach()) * (
            depth < tokenizer.config.mlp_layers)
        return tokenizer.decoder(latent, coarse)[0]

    jacobian = torch.autograd.functional.jacobian(output, z)[:, 0]          # [O, C]
    return torch.sign(jacobian[rows])


def changes(tokenizer: ActionTokenizer, tokens: torch.Tensor, depth: int,
            tails: torch.Tensor) -> torch.Tensor:
    """|decode(prefix + tail) - decode(prefix)| [n, T, A] for tails [n, L-depth, T, D]."""
    prefix = tokens[:, :depth].expand(len(tails), -1, -1, -1)
    full = torch.cat([prefix, tails], dim=1)
    return (tokenizer.decode(full) - tokenizer.decode(prefix)).abs()


def test_gelu_slope_range_is_exact_on_intervals():
    rng = np.random.default_rng(0)
    low = torch.from_numpy(rng.uniform(-5, 5, 500))
    high = low + torch.from_numpy(rng.uniform(0, 4, 500))
    minimum, maximum = gelu_slope_range(low, high)
    grid = low[:, None] + (high - low)[:, None] * torch.linspace(0, 1, 2001, dtype=torch.float64)
    slopes = gelu_slope(grid)
    assert torch.all(minimum <= slopes.min(1).values + 1e-12)
    assert torch.all(maximum >= slopes.max(1).values - 1e-12)
    assert torch.allclose(minimum, slopes.min(1).values, atol=1e-6)
    assert torch.allclose(maximum, slopes.max(1).values, atol=1e-6)
    x = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(x).sum().backward()
    assert torch.allclose(gelu_slope(x.detach()), x.grad)


@pytest.mark.parametrize('coarse_layers', [0, 3])
def test_certificate_holds_against_random_and_adversarial_codes(coarse_layers):
    tokenizer = random_tokenizer(coarse_layers)
    generator = torch.Generator().manual_seed(1)
    worst_ratio = 0.0
    for seed in range(12):
        tokens = random_tokens(1, seed)
        for depth in range(1, 8):
            bound = tokenizer.truncation_bound(tokens, depth)[0]                # [T, A]
            skipped = 8 - depth
            random_tails = torch.randint(0, LEVELS, (32, skipped, 8, 16), generator=generator)
            extreme_tails = torch.randint(0, 2, (32, skipped, 8, 16), generator=generator) * 6
            signs = jacobian_signs(tokenizer, tokens, depth, rows=list(range(0, 56, 5)))
            signs = torch.cat([signs, -signs])                                  # [2R, C]
            adversarial = ((signs > 0).long() * 6).view(-1, 1, 8, 16).expand(-1, skipped, -1, -1)
            for tails in (random_tails, extreme_tails, adversarial):
                moved = changes(tokenizer, tokens, depth, tails)                 # [n, T, A]
                assert torch.all(moved <= bound + 1e-12), (coarse_layers, seed, depth)
            witness = tokenizer.truncation_witness(tokens, depth)[0]
            assert torch.all(witness <= bound + 1e-12)
            worst_ratio = max(worst_ratio, float(changes(
                tokenizer, tokens, depth, adversarial).max() / bound.max()))
        assert torch.all(tokenizer.truncation_bound(tokens, 8) == 0)
        assert torch.all(tokenizer.truncation_bound(tokens, 3)[0, :, 3] == 0)  # constant dim
    assert worst_ratio > 0.5          # the certificate is not vacuous: codes come close to it


def test_coarse_layer_certificate_is_exact_and_input_independent():
    tokenizer = random_tokenizer(coarse_layers=2)
    tokens = random_tokens(6, seed=3)
    for depth in range(2, 8):
        bound = tokenizer.truncation_bound(tokens, depth)                       # [6, T, A]
        assert torch.allclose(bound, bound[:1].expand_as(bound), rtol=0, atol=0)
        # the bound is reached: all skipped codes at the extreme in the sign pattern of W
        weight = tokenizer.decoder.linear.weight
        gain = tokenizer.normalizer.gain().repeat(8)
        row = int((weight.abs().sum(1) * gain).argmax())
        tail = ((weight[row] > 0).long() * 6).view(1, 1, 8, 16).expand(1, 8 - depth, -1, -1)
        reached = changes(tokenizer, tokens[:1], depth, tail)[0].flatten()[row]
        assert math.isclose(float(reached), float(bound[0].flatten()[row]), rel_tol=1e-9)
        witness = tokenizer.truncation_witness(tokens, depth)
        assert torch.allclose(witness.flatten(1)[:, row], bound.flatten(1)[:, row], rtol=1e-9)


def test_bound_shrinks_with_depth_on_a_trained_like_tokenizer():
    tokenizer = random_tokenizer(coarse_layers=3)
    tokens = random_tokens(1, seed=5)
    bounds = [float(tokenizer.truncation_bound(tokens, d).max()) for d in range(3, 9)]
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False))
