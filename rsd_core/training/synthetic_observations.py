"""Observation directories of generated images: random coloured shapes on a table-like
background, each paired with a LIBERO instruction. For tests and for bundles built without
LIBERO (`rsd build-default` distils its draft on them when no observations are given).
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rsd_core.observations import ObservationWriter

# LIBERO task language (libero_spatial, libero_object, libero_goal), for synthetic observations.
LIBERO_INSTRUCTIONS = (
    ('libero_spatial', 'pick up the black bowl between the plate and the ramekin and place it on '
                       'the plate'),
    ('libero_spatial', 'pick up the black bowl next to the ramekin and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl from table center and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the cookie box and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl in the top drawer of the wooden cabinet and place '
                       'it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the ramekin and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl next to the cookie box and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the stove and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl next to the plate and place it on the plate'),
    ('libero_spatial', 'pick up the black bowl on the wooden cabinet and place it on the plate'),
    ('libero_object', 'pick up the alphabet soup and place it in the basket'),
    ('libero_object', 'pick up the cream cheese and place it in the basket'),
    ('libero_object', 'pick up the ketchup and place it in the basket'),
    ('libero_goal', 'open the middle drawer of the cabinet'),
    ('libero_goal', 'put the bowl on the plate'),
    ('libero_goal', 'put the wine bottle on top of the cabinet'),
    ('libero_goal', 'turn on the stove'),
)


def write_synthetic_observations(directory: str | Path, count: int = 32, seed: int = 0,
                                 image_size: int = 128) -> Path:
    """Write an observation directory of `count` generated [S, S, 3] images (S = image_size),
    each with a random LIBERO instruction, suite, task_id and init_state (step 0)."""
    rng = np.random.default_rng(seed)
    with ObservationWriter(directory) as writer:
        for _ in range(count):
            image = shapes_image(rng, image_size)
            task_id = int(rng.integers(0, len(LIBERO_INSTRUCTIONS)))
            suite, instruction = LIBERO_INSTRUCTIONS[task_id]
            writer.add(image, instruction, suite=suite, task_id=task_id,
                       init_state=int(rng.integers(0, 50)), step=0)
    return Path(directory)


def shapes_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """2-5 random rectangles, ellipses and triangles on a vertical colour ramp: [S, S, 3] uint8."""
    top, bottom = rng.integers(40, 220, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).copy())
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, size - 16, size=2)
        w, h = rng.integers(12, size // 2, size=2)
        box = (int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle(box, fill=colour)
        elif shape == 1:
            draw.ellipse(box, fill=colour)
        else:
            apex = ((box[0] + box[2]) // 2, box[1])
            draw.polygon([(box[0], box[3]), (box[2], box[3]), apex], fill=colour)
    return np.asarray(image)
