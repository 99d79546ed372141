"""The samples of behaviour cloning: frame t of a demo episode with its task language (and robot
state), and the action chunk t..t+T-1 as target codes [L, C]; batches of one prompt length.

Batches hold prompts of one token length (the processor does not pad); training batches are
drawn with a caller-seeded generator, so a resumed run repeats what an uninterrupted one did.
"""

import numpy as np
import torch

from rsd_core.main_model import MainModel
from rsd_core.tokenizer import ActionTokenizer, tokens_to_codes
from rsd_core.training.augmentation import augment_images
from rsd_core.training.demos import Episode, episode_chunks
from rsd_core.training.frames import FrameReader


class DemoData:
    """Samples (episode, t) at an episode's labelled steps (all steps when it has no marks),
    with their target codes, batched by prompt length.

    codes: [n, L, C] uint8, the tokenizer's codes of every sample's action chunk, encoded once
    in fixed batches (late layers are at float rounding level and would flicker otherwise).
    """

    def __init__(self, episodes: list[Episode], model: MainModel, tokenizer: ActionTokenizer,
                 frames: FrameReader):
        self.episodes, self.frames, self.processor = episodes, frames, model.processor
        self.chunk_len = tokenizer.config.chunk_len
        lengths = [e.length for e in episodes]
        keep = np.concatenate([np.ones(e.length, bool) if e.labelled is None else e.labelled
                               for e in episodes])  # [steps] bool: a sample may start here
        self.episode = np.repeat(np.arange(len(episodes)), lengths)[keep]  # [n]
        self.t = np.concatenate([np.arange(n) for n in lengths])[keep]  # [n]
        chunks = np.concatenate([episode_chunks(e.actions, self.chunk_len) for e in episodes])
        self.chunks = chunks[keep]  # [n, T, A] float32, action units
        self.codes = encode_chunks(tokenizer, self.chunks)  # [n, L, C] uint8
        prompt_len = {text: int(self.processor.encode_text([text]).shape[1])
                      for text in {e.instruction for e in episodes}}
        self.prompt_len = np.array([prompt_len[episodes[i].instruction] for i in self.episode])

    def __len__(self) -> int:
        return len(self.t)

    def samples_of(self, episode_indices: list[int]) -> np.ndarray:
        """Sample indices [m] of the given episodes, in sample order."""
        return np.flatnonzero(np.isin(self.episode, episode_indices))

    def batch(self, indices: np.ndarray, generator: torch.Generator | None = None,
              ) -> tuple[dict, torch.Tensor]:
        """Model inputs and target codes [B, L, C] long of samples of one prompt length.

        generator: augment the images with it (training); None: no augmentation.
        """
        images = np.stack([self.frames.frame(int(self.episode[i]), int(self.t[i]))
                           for i in indices])  # [B, S, S, 3]
        if generator is not None:
            images = augment_images(torch.from_numpy(images), generator).numpy()
        episodes = [self.episodes[int(self.episode[i])] for i in indices]
        inputs = self.processor(list(images), [e.instruction for e in episodes])
        if episodes[0].proprio is not None:
            inputs['proprio'] = torch.from_numpy(np.stack(
                [e.proprio[int(self.t[i])] for e, i in zip(episodes, indices, strict=True)]))
        return inputs, torch.from_numpy(self.codes[indices]).long()

    def draw(self, pool: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """A batch from `pool`: a uniformly drawn sample fixes the prompt length (so lengths
        are drawn in proportion to their samples), the rest come from that length's samples."""
        anchor = pool[rng.integers(len(pool))]
        same = pool[self.prompt_len[pool] == self.prompt_len[anchor]]
        return rng.choice(same, size=batch_size, replace=len(same) < batch_size)

    def eval_batches(self, pool: np.ndarray, limit: int, batch_size: int) -> list[np.ndarray]:
        """At most `limit` samples spread evenly over `pool`, batched by prompt length."""
        if len(pool) > limit:
            pool = pool[np.linspace(0, len(pool) - 1, limit).round().astype(int)]
        batches = []
        for length in np.unique(self.prompt_len[pool]):
            group = pool[self.prompt_len[pool] == length]
            batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
        return batches


@torch.no_grad()
def encode_chunks(tokenizer: ActionTokenizer, chunks: np.ndarray,
                  batch_size: int = 4096) -> np.ndarray:
    """Chunks [n, T, A] -> codes [n, L, C] uint8 (engine layout)."""
    out = [tokens_to_codes(tokenizer.encode(torch.from_numpy(chunks[i:i + batch_size])))
           .to(torch.uint8).cpu().numpy() for i in range(0, len(chunks), batch_size)]
    return np.concatenate(out)
