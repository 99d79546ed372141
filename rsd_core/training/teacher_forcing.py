"""The policy's training forward: teacher forcing over the residual layers in ONE causal pass.

    [prompt (image tokens + words)] [layer 0] [layer 1] ... [layer L-2]
                               ^ head -> layer 0   ^ head -> layer 2 ...
            head(hidden at last prompt position) -> logits of layer 0
            head(hidden at the position of layer l) -> logits of layer l+1

This is the decoding the engine does (prefill, then one position per layer), so greedy decoding
at test time sees what training saw. The forward may run under autocast (`autocast`) while the
master weights stay float32.
"""

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rsd_core.main_model import MainModel

AUTOCAST_DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}


def teacher_forced_logits(model: MainModel, inputs: dict, codes: torch.Tensor) -> torch.Tensor:
    """ONE causal forward over [prompt, layers 0..L-2] -> logits of layers 0..L-1 [B, L, C, V].

    codes [B, L, C] long (the targets; layers 0..L-2 are fed). The prompt positions are exactly
    those of `MainModel.prefill` (`embed_prompt`); position ids run on from the prompt as in
    `MainModel.forward_layers`.
    """
    prompt, pixel_values, _ = model.embed_prompt(inputs)  # [B, S', H]
    codes = codes.to(model.device)
    layers = model.layer_embedding(codes[:, :-1], first_layer=0)  # [B, L-1, H]
    embeds = torch.cat([prompt, layers.to(prompt.dtype)], dim=1)  # [B, S'+L-1, H]
    batch, length = embeds.shape[:2]
    positions = torch.arange(length, device=model.device).expand(batch, length)
    out = model.backbone.model(inputs_embeds=embeds, pixel_values=pixel_values,
                               position_ids=positions, use_cache=False)
    hidden = out.last_hidden_state[:, prompt.shape[1] - 1:]  # [B, L, H]
    return model.rfsq_head(hidden)  # [B, L, C, V]


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """Mixed-precision context of the forward pass (none for float32)."""
    compute = AUTOCAST_DTYPES[dtype]
    if compute is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


def training_attention(device: torch.device, dtype: str) -> AbstractContextManager:
    """Attention backend of a whole training step (forward, backward and gradient
    checkpointing's recomputation, which must match the forward).

    On the CPU, bfloat16 takes the math backend: PyTorch's CPU flash-attention backward in
    bfloat16 took 4x its float32 time on this project's AMX Xeon (467 against 109 ms in a
    32-sample step of the small preset), which the math backend's bfloat16 matmuls avoid (the
    step: 0.95 s against 1.11 s with flash and 1.8 s in float32, 1 thread).
    """
    if device.type == 'cpu' and AUTOCAST_DTYPES[dtype] is not None:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()
