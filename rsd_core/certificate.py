"""Certified residual depth: how much the residual layers NOT decoded could still move an action.

After m of the L RFSQ layers are decided, the summed quantized latent is z (the prefix) and the
layers m..L-1 can only add delta = sum_l s_l c_l, with s_l the layer scales and every code
c_l in [-1, 1] (the V levels are symmetric on [-1, 1]); so |delta_j| <= r = sum_{l>=m} s_l for
every latent scalar j, and every point of that box is reached by some choice of codes at the
corners. `decoder_change_bound` bounds |decoder(z + delta) - decoder(z)| over the whole box:
an upper bound over every possible code of the skipped layers, not a statistic.

The decoder is a linear map plus a GELU MLP, y = W z + mlp(u), where the MLP sees u = z (every
layer) or, in a tokenizer with `coarse_layers` = c, only the sum of the first c layers; the
radius of the box splits into r_mlp (skipped layers the MLP sees) and r_lin (skipped layers that
enter through W alone). Naive interval arithmetic through the MLP loses the correlation between
its layers and is ~200x loose. Here the MLP is linearised around the prefix instead (mean value
theorem per GELU unit: gelu(h + e) - gelu(h) = gelu'(xi) e for some xi between, and the slope
range over an interval is exact since gelu'' = phi(x)(2 - x^2) vanishes only at +-sqrt(2)):

    h1 = W1 u + b1,  rho1 = |W1| 1 r_mlp            pre-activation radius, layer 1
    slopes of layer 1 in [mid1 - half1, mid1 + half1] on [h1 - rho1, h1 + rho1]
    delta a1 = mid1 W1 delta_u + e1,  |e1| <= half1 rho1 = eps1
    G2 = W2 mid1 W1,  rho2 = |G2| 1 r_mlp + |W2| eps1          layer-2 pre-activation radius
    slopes of layer 2 in [mid2 - half2, mid2 + half2]
    J = W + W3 mid2 G2                                           the linearised Jacobian
    bound = |J| 1 r_mlp + |W| 1 r_lin + |W3 mid2 W2| eps1 + |W3| (half2 rho2)

The first term is the exact maximum of the linearisation over the box; the others are the
(second-order, small) price of the slopes varying inside it. With c coarse layers and m >= c
the MLP sees nothing of the skipped layers (r_mlp = 0) and the bound is |W| 1 r_lin: exact.

Shapes: B batch, C latent size (= T*D = 128), O decoder outputs (= T*A = 56), H MLP width.
Everything is computed in float64.
"""

import math

import torch
from torch import nn

SQRT2 = math.sqrt(2.0)


def gelu_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the exact (erf) GELU: Phi(x) + x phi(x), elementwise."""
    return 0.5 * (1.0 + torch.erf(x / SQRT2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(
        2.0 * math.pi)


def gelu_slope_range(low: torch.Tensor, high: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the GELU slope over [low, high], elementwise (low <= high).

    gelu' is decreasing below -sqrt(2), increasing between -sqrt(2) and sqrt(2) and decreasing
    above, so its extremes over an interval are at the ends or at +-sqrt(2) when inside.
    """
    ends = torch.stack([gelu_slope(low), gelu_slope(high)])                  # [2, ...]
    minimum, maximum = ends.min(0).values, ends.max(0).values
    floor = gelu_slope(torch.tensor(-SQRT2, dtype=low.dtype, device=low.device))
    peak = gelu_slope(torch.tensor(SQRT2, dtype=low.dtype, device=low.device))
    minimum = torch.where((low <= -SQRT2) & (high >= -SQRT2), floor, minimum)
    maximum = torch.where((low <= SQRT2) & (high >= SQRT2), peak, maximum)
    return minimum, maximum


def mlp_layers(mlp: nn.Sequential) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The three Linear layers of a Linear-GELU-Linear-GELU-Linear MLP; ValueError otherwise."""
    kinds = [type(module) for module in mlp]
    gelus = [m for m in mlp if isinstance(m, nn.GELU)]
    if kinds != [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear] or \
            any(g.approximate != 'none' for g in gelus):
        raise ValueError(f'the certificate needs a Linear-GELU(erf)-Linear-GELU(erf)-Linear '
                         f'MLP, got {kinds}')
    return mlp[0], mlp[2], mlp[4]


def _abs_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Row sums of |matrix| over the last axis: [..., R, K] -> [..., R]."""
    return matrix.abs().sum(-1)


def decoder_change_bound(linear: nn.Linear, mlp: nn.Sequential, mlp_input: torch.Tensor,
                         r_mlp: float, r_lin: float) -> torch.Tensor:
    """Upper bound on |y(z + delta) - y(z)| for y = linear(z) + mlp(u), over every delta
    (see the module docstring). Units: the decoder's output units (normalised actions).

    mlp_input: u at the prefix, [B, C]; r_mlp: box radius of the skipped layers the MLP sees;
    r_lin: box radius of the skipped layers only `linear` sees. Returns [B, O] float64.
    """
    w = linear.weight.double()                                                # [O, C]
    first, second, third = mlp_layers(mlp)
    w1, w2, w3 = first.weight.double(), second.weight.double(), third.weight.double()
    u = mlp_input.double()                                                    # [B, C]
    bound = _abs_rows(w) * r_lin                                              # [O]
    if r_mlp == 0.0:
        return bound.expand(u.shape[0], -1).clone()                           # [B, O]
    h1 = u @ w1.T + first.bias.double()                                       # [B, H]
    rho1 = _abs_rows(w1) * r_mlp                                              # [H]
    low1, high1 = gelu_slope_range(h1 - rho1, h1 + rho1)
    mid1, half1 = (low1 + high1) / 2, (high1 - low1) / 2                      # [B, H]
    eps1 = half1 * rho1                                                       # [B, H]
    h2 = nn.functional.gelu(h1) @ w2.T + second.bias.double()                 # [B, H]
    g2 = w2 @ (mid1[:, :, None] * w1)                                         # [B, H, C]
    rho2 = _abs_rows(g2) * r_mlp + eps1 @ w2.abs().T                          # [B, H]
    low2, high2 = gelu_slope_range(h2 - rho2, h2 + rho2)
    mid2, half2 = (low2 + high2) / 2, (high2 - low2) / 2                      # [B, H]
    jacobian = w + w3 @ (mid2[:, :, None] * g2)                               # [B, O, C]
    spread = w3 @ (mid2[:, :, None] * w2)                                     # [B, O, H]
    return (bound + _abs_rows(jacobian) * r_mlp
            + (spread.abs() @ eps1[:, :, None])[..., 0]
            + (half2 * rho2) @ w3.abs().T)                                    # [B, O]


class DepthCertifier:
    """Truncation certificates of one frozen decoder, in action units, with what does not
    depend on the input precomputed: the radii per depth, the whole (linear, exact) bound at
    depths >= the coarse layers, and the witness directions.

    linear, mlp: the decoder y = linear(z) + mlp(u); scales [L] layer scales; gain [A] action
    units per normalised unit; mlp_layers: layers the MLP sees (L when it sees all).
    """

    def __init__(self, linear: nn.Linear, mlp: nn.Sequential, scales: torch.Tensor,
                 gain: torch.Tensor, chunk_len: int, mlp_layers: int,
                 witness_values: int = 4) -> None:
        self.linear, self.mlp = linear, mlp
        self.mlp_layers, self.num_layers = mlp_layers, len(scales)
        self.gain = gain.double().repeat(chunk_len)                              # [O]
        self.shape = (chunk_len, len(gain))
        scales = scales.detach().double()
        self.radii = [(float(scales[d:mlp_layers].sum()) if d < mlp_layers else 0.0,
                       float(scales[max(d, mlp_layers):].sum()))
                      for d in range(self.num_layers + 1)]                     # (r_mlp, r_lin)
        weight = linear.weight.detach().double()                                 # [O, C]
        self._linear = [(_abs_rows(weight) * r_lin * self.gain).view(self.shape)
                        for _, r_lin in self.radii]                              # [T, A] each
        rows = (_abs_rows(weight) * self.gain).topk(min(witness_values, len(self.gain)))
        signs = torch.sign(weight[rows.indices])
        self._signs = torch.cat([signs, -signs]).to(linear.weight.dtype)        # [2P, C]

    def bound(self, mlp_input: torch.Tensor, depth: int) -> torch.Tensor:
        """Certified bound [B, T, A] (action units, float64) on how much layers depth..L-1
        can move the decoded actions, for prefixes whose MLP input is mlp_input [B, C]."""
        r_mlp, r_lin = self.radii[depth]
        if r_mlp == 0.0:
            return self._linear[depth].expand(len(mlp_input), -1, -1)
        bound = decoder_change_bound(self.linear, self.mlp, mlp_input, r_mlp, r_lin)
        return (bound * self.gain).unflatten(-1, self.shape)

    def witness(self, z: torch.Tensor, mlp_input: torch.Tensor | None,
                depth: int) -> torch.Tensor:
        """Largest |change| [B, T, A] (action units) over a few actual choices of the skipped
        codes: all at the extreme level in the sign pattern of the most sensitive rows of the
        linear map (or the opposite), which adds exactly +-r to every latent scalar. A lower
        bound on the worst case, so a witness above a tolerance rules the depth out.

        z [B, C]: summed latent of the prefix; mlp_input [B, C] or None (the MLP sees z)."""
        r_mlp, r_lin = self.radii[depth]
        moved_z = z[:, None] + (r_mlp + r_lin) * self._signs                    # [B, 2P, C]
        moved_u = None if mlp_input is None else mlp_input[:, None] + r_mlp * self._signs
        moved = self.linear(moved_z) + self.mlp(moved_z if moved_u is None else moved_u)
        base = self.linear(z) + self.mlp(z if mlp_input is None else mlp_input)  # [B, O]
        change = (moved - base[:, None]).abs().amax(1).double() * self.gain     # [B, O]
        return change.unflatten(-1, self.shape)
