"""Agent-view frames of LIBERO demos, read lazily, upright, at the model's image size; and an
observation directory of chosen frames (what `rsd train-policy` distils its draft on).
"""

from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from rsd_core.observations import ObservationWriter
from rsd_core.training.demos import CAMERA, Episode, open_demo_file


class FrameReader:
    """Agent-view frames read lazily from the HDF5 files, upright, at the model's image size.

    A frame is read, rotated 180 degrees (LIBERO stores it upside down relative to a camera),
    resized (antialiased bilinear, like the processor) to [S, S, 3] uint8 and kept in memory
    while the cache holds less than `cache_mb`.
    """

    def __init__(self, episodes: list[Episode], image_size: int, cache_mb: float = 1024.0):
        self.episodes, self.image_size = episodes, image_size
        self._capacity = int(cache_mb * 1e6) // (image_size * image_size * 3)
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._files: dict[Path, h5py.File] = {}

    def raw(self, episode: int, t: int) -> np.ndarray:
        """Frame t of an episode, upright, at its stored size [H, W, 3] uint8."""
        info = self.episodes[episode]
        if info.file not in self._files:
            self._files[info.file] = open_demo_file(info.file)
        frame = self._files[info.file]['data'][info.demo]['obs'][CAMERA][t]  # [H, W, 3]
        return np.ascontiguousarray(frame[::-1, ::-1])

    def frame(self, episode: int, t: int) -> np.ndarray:
        """Frame t of an episode, upright, [S, S, 3] uint8."""
        key = (episode, t)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        image = resize_uint8(self.raw(episode, t), self.image_size)
        if len(self._cache) < self._capacity:
            self._cache[key] = image
        return image

    def close(self) -> None:
        """Close the open HDF5 files."""
        for stream in self._files.values():
            stream.close()
        self._files.clear()


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8 (antialiased bilinear, as the processor)."""
    if image.shape[:2] == (size, size):
        return image
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def write_frame_observations(frames: FrameReader, samples: list[tuple[int, int]],
                             directory: Path) -> Path:
    """An observation directory (upright frames at their stored size) of the given
    (episode, t) frames, with each demo's language and robot state."""
    with ObservationWriter(directory) as writer:
        for episode, t in samples:
            info = frames.episodes[episode]
            writer.add(frames.raw(episode, t), info.instruction,
                       None if info.proprio is None else info.proprio[t],
                       source=str(info.file), demo=info.demo, step=t)
    return directory
