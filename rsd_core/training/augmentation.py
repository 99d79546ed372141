"""The image augmentation of training: random resized crop (optionally rotated), colour jitter,
optionally a hue shift. One function for policy training (crop + jitter) and draft
distillation (plus a small rotation and hue shift: `DISTILL_AUGMENTATION`), seeded by a torch
generator so a resumed or re-batched run draws exactly the same images.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# Settings of draft distillation (on top of the defaults): the main's tokens are recorded on
# these views, so the draft sees the small pose and lighting changes a camera gives.
DISTILL_AUGMENTATION = {'max_rotation_deg': 5.0, 'max_hue': 0.03}
# RGB -> YIQ (luma, two chroma axes) and back: a hue shift is a rotation of the chroma plane.
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                           [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def seeded_generator(*seeds: int) -> torch.Generator:
    """A CPU torch generator seeded from a tuple of integers (numpy's SeedSequence), so nearby
    seed tuples give independent streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(seeds).generate_state(1)[0]))


def augment_images(images: torch.Tensor, generator: torch.Generator, min_crop: float = 0.9,
                   jitter: float = 0.2, max_rotation_deg: float = 0.0,
                   max_hue: float = 0.0) -> torch.Tensor:
    """Random resized crop (side fraction min_crop..1 of the image, anywhere inside it, turned
    by up to +-max_rotation_deg, resized back), brightness / contrast / saturation jitter
    (factors 1 +- jitter) and a hue shift of up to +-max_hue turns. Each image draws its own.

    images [B, H, W, 3] uint8 -> [B, H, W, 3] uint8.
    """
    batch, height, width = images.shape[:3]
    # Random draws first, in a fixed order (rotation and hue only when enabled).
    scale = torch.empty(batch).uniform_(min_crop, 1.0, generator=generator)  # [B]
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1.0 - scale)[:, None]  # [B, 2]
    factors = 1 + (torch.rand(batch, 3, 1, 1, 1, generator=generator) * 2 - 1) * jitter
    x = images.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    theta = torch.zeros(batch, 2, 3)  # output -> input coordinates, normalised to [-1, 1]
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    if max_rotation_deg > 0:
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)  # [B] each
        # A rotation in pixels, written in coordinates normalised per axis.
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
        theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    x = x * factors[:, 0]  # brightness
    grey = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    x = grey + (x - grey) * factors[:, 1]  # contrast
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # [B, 1, H, W]
    x = luma + (x - luma) * factors[:, 2]  # saturation
    if max_hue > 0:
        turn = (torch.rand(batch, generator=generator) * 2 - 1) * (2 * math.pi * max_hue)  # [B]
        rotation = torch.zeros(batch, 3, 3)
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1], rotation[:, 1, 2] = torch.cos(turn), -torch.sin(turn)
        rotation[:, 2, 1], rotation[:, 2, 2] = torch.sin(turn), torch.cos(turn)
        colour = YIQ_TO_RGB @ rotation @ RGB_TO_YIQ  # [B, 3, 3]
        x = torch.einsum('bij,bjhw->bihw', colour, x)  # hue
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # [B, H, W, 3]
