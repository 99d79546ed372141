"""The certificate check of bounded decoding: may a chunk stop after m decided layers?

`depth_certifier` builds `certify(codes [B, m, C])`, which decodes the m layers (float64) and
returns (certified bound, actions) when the bound on what layers m..L-1 could still change is
within the tolerance for every row, else None. Shapes: B batch, m decided layers, C codes per
layer, T chunk steps, A action dims; bounds and actions in action units.
"""

from collections.abc import Callable

import torch

from rsd_core.certificate import DepthCertifier
from rsd_core.tokenizer import ActionTokenizer, codes_to_tokens

# certify(codes [B, m, C]) -> (certified bound [B, T, A], actions [B, T, A]) in action units,
# or None when depth m cannot be certified within the tolerance
Certifier = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]
# Relative rounding of the float32 cast of a float64 result (one half ulp each, two results).
CAST_ROUNDING = 2.0 ** -23


def depth_certifier(tokenizer: ActionTokenizer, certificates: DepthCertifier,
                    tolerance: float | tuple[float, ...], device: torch.device) -> Certifier:
    """certify(codes [B, m, C]) for `tokenizer` (float64) and `tolerance` (action units, one
    value or one per action dim). Below the tokenizer's coarse layers (where the certificate
    depends on the input and costs ~2 ms) a witness, actual codes that move an action by more
    than the tolerance, rules a depth out first. The float32 cast of this result and of
    main-only's adds its rounding to the bound."""
    latent_dim, num_layers = tokenizer.config.latent_dim, tokenizer.config.num_layers
    limit = torch.as_tensor(tolerance, dtype=torch.float64, device=device)

    def certify(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        depth = codes.shape[1]
        z, u = tokenizer.decoder_inputs(codes_to_tokens(codes, latent_dim), depth)
        if depth < certificates.mlp_layers and \
                bool((certificates.witness(z, u, depth) > limit).any()):
            return None
        actions = tokenizer.decode_latent(z, u)                   # [B, T, A]
        if depth == num_layers:
            return torch.zeros_like(actions), actions
        bound = certificates.bound(z if u is None else u, depth)
        bound = bound + CAST_ROUNDING * (actions.abs() + bound) + 1e-12
        return (bound, actions) if bool((bound <= limit).all()) else None

    return certify
