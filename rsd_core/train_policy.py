"""`rsd train-policy`: behaviour cloning of the main model on LIBERO HDF5 demonstrations.

One sample is frame t of a demo (the agent-view image, rotated 180 degrees from LIBERO's raw
orientation to upright, as a camera and the sim bridge deliver it) with its task language, and
the action chunk t..t+T-1 (padded with the episode's last action). The action tokenizer turns the
chunk into target codes [L, C]. Training is teacher forcing over the residual layers, in ONE
causal forward pass:

    [prompt (image tokens + words)] [layer 0] [layer 1] ... [layer L-2]
                               ^ head -> layer 0   ^ head -> layer 2 ...
            head(hidden at last prompt position) -> logits of layer 0
            head(hidden at the position of layer l) -> logits of layer l+1

with cross-entropy over all L x C codes. This is the decoding the engine does (prefill, then
one position per layer), so greedy decoding at test time sees what training saw. Backbone, RFSQ
head and layer embedding are all trained (AdamW, linear warm-up + cosine decay, gradient
clipping). Training images get random resized crops and colour jitter; held-out episodes
(split per task) get none and report per-layer token accuracy and the action L1 error of
main-only greedy decoding. Batches hold prompts of one token length (the processor does not
pad), drawn with a per-step seeded generator, so a resumed run repeats exactly what an
uninterrupted one would have done.

Output directory:

    <out>/                  a complete bundle (docs/ARCHITECTURE.md), provenance records the demos
                            (paths + sha256), steps, seed, settings and metrics
    <out>/draft/            the default draft distilled from the trained model (--distill-draft),
                            on observations written from the demo frames
    <out>/checkpoint/       action_tokenizer/ + step-<N>/{model,optimizer}.safetensors +
                            state.json: resume with --resume (no pickles anywhere)

CPU (this machine): `rsd train-policy --demos demos/ --out models/bc --preset default`.
Use --threads 1 when the cores are shared (two threads under load are ~10x slower).

Fine-tuning a larger LLaVA-style backbone on a GPU (e.g. an OpenVLA-style checkpoint converted to
a bundle with its own `backbone/`, heads and action tokenizer):

    rsd train-policy --demos libero_spatial/ --out models/bc-7b --init models/llava-7b \\
        --tokenizer models/llava-7b/action_tokenizer --device cuda --dtype bfloat16 \\
        --batch-size 8 --grad-accum 4 --lr 2e-5 --warmup-steps 200 --steps 20000 \\
        --freeze-vision --gradient-checkpointing --threads 4 --cache-mb 8192

--init loads the bundle (its prompt template, action names and control period are kept),
--dtype bfloat16 runs the forward under autocast while the master weights and AdamW moments stay
float32 (a 7B needs ~16 bytes per trained parameter plus activations: shard or freeze parts),
--freeze-vision keeps the vision tower fixed, --gradient-checkpointing trades compute for
activation memory, --grad-accum multiplies the effective batch. Only the small built-in
backbones are exercised on this machine.
"""

import argparse
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
import json
import logging
import math
from pathlib import Path
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsd_core.bundle import (
    DEFAULT_ACTION_NAMES,
    MANIFEST,
    PRESETS,
    load_bundle_manifest,
    make_readable,
    new_main_model,
    write_bundle,
)
from rsd_core.checkpoint import (
    CheckpointError,
    check_state_dict,
    file_sha256,
    load_manifest,
    load_tensors,
    save_component,
)
from rsd_core.demos import (
    demo_groups,
    episode_chunks,
    find_demo_files,
    open_demo_file,
    read_actions,
)
from rsd_core.distill import distill_draft, learning_rate
from rsd_core.distill import summary_line as draft_summary
from rsd_core.main_model import MainModel
from rsd_core.tokenizer import (
    ActionTokenizer,
    TokenizerConfig,
    codes_to_tokens,
    tokens_to_codes,
)
from rsd_core.train_tokenizer import fit_tokenizer, torch_threads

logger = logging.getLogger(__name__)

CAMERA = 'agentview_rgb'
# Proprioception: LIBERO's obs datasets, concatenated, and the names of their values as the
# robot's JointState (and so the sim bridge's joint_states) carries them.
PROPRIO_DATASETS = ('joint_states', 'gripper_states')
PROPRIO_NAMES = tuple(f'robot0_joint{i}' for i in range(1, 8)) + \
    ('gripper0_finger_joint1', 'gripper0_finger_joint2')
STATE_FORMAT = 'rsd-train-policy-state'
STATE_VERSION = 1
# Settings a resumed run must share with the run it continues (anything else may change).
RESUME_KEYS = ('demos', 'init', 'preset', 'seed', 'heldout_fraction', 'freeze_vision',
               'proprio')
# Identity keys added after the first checkpoints, with the value those checkpoints imply.
LATER_KEYS = {'proprio': False}
AUTOCAST_DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}
WEIGHTS = 'behaviour cloning (rsd train-policy)'  # provenance['weights'] of its bundles


@dataclass
class TrainPolicyConfig:
    """Settings of one behaviour-cloning run (the CLI flags, see `add_arguments`)."""

    demos: list[str]
    out: str
    init: str | None = None
    preset: str = 'default'
    tokenizer: str | None = None
    tokenizer_steps: int = 2000
    steps: int = 5000
    stop_after: int | None = None       # end this session at that step (checkpointed)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None     # None: 5 % of the steps
    grad_clip: float = 1.0
    device: str = 'cpu'
    dtype: str = 'float32'              # autocast dtype; master weights stay float32
    seed: int = 0
    resume: bool = False
    heldout_fraction: float = 0.1
    augment: bool = True
    eval_every: int = 500
    eval_samples: int = 256
    save_every: int = 500
    cache_mb: float = 1024.0            # decoded frames kept in memory, uint8 at the model's size
    freeze_vision: bool = False
    proprio: bool = True                # condition on obs/joint_states + obs/gripper_states
    gradient_checkpointing: bool = False
    distill_draft: bool = True
    draft_observations: int = 256
    draft_samples: int = 1024
    draft_epochs: int = 40
    threads: int | None = 1
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError listing every out-of-range setting."""
        positive = {'steps': self.steps, 'batch_size': self.batch_size,
                    'grad_accum': self.grad_accum, 'eval_every': self.eval_every,
                    'save_every': self.save_every, 'eval_samples': self.eval_samples,
                    'draft_observations': self.draft_observations,
                    'draft_samples': self.draft_samples, 'draft_epochs': self.draft_epochs}
        bad = [f'{k} = {v}' for k, v in positive.items() if v < 1]
        if self.tokenizer_steps < 0 or self.lr <= 0 or self.weight_decay < 0 \
                or self.grad_clip <= 0 or self.cache_mb < 0:
            bad.append('tokenizer_steps >= 0, lr > 0, weight_decay >= 0, grad_clip > 0 and '
                       'cache_mb >= 0 are required')
        if not 0 <= self.heldout_fraction < 1:
            bad.append(f'heldout_fraction = {self.heldout_fraction} (expected 0 <= f < 1)')
        if self.stop_after is not None and self.stop_after < 1:
            bad.append(f'stop_after = {self.stop_after}')
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad.append(f'warmup_steps = {self.warmup_steps}')
        if self.threads is not None and self.threads < 1:
            bad.append(f'threads = {self.threads}')
        if self.dtype not in AUTOCAST_DTYPES:
            bad.append(f'dtype {self.dtype!r} (expected one of {sorted(AUTOCAST_DTYPES)})')
        if self.init is None and self.preset not in PRESETS:
            bad.append(f'preset {self.preset!r} (expected one of {sorted(PRESETS)})')
        if not self.demos:
            bad.append('no demo files given')
        if bad:
            raise ValueError('invalid training settings: ' + '; '.join(bad))


# ---------------------------------------------------------------- demonstrations

@dataclass
class Episode:
    """One `data/demo_<i>` group: actions in memory, frames read lazily."""

    file: Path
    demo: str
    instruction: str
    actions: np.ndarray                 # [N, A] float32, action units
    proprio: np.ndarray | None = None   # [N, P] float32, PROPRIO_DATASETS concatenated

    @property
    def length(self) -> int:
        """N, the number of steps (actions) in the episode."""
        return len(self.actions)


def _instruction(path: Path, data: h5py.Group) -> str:
    """The task language in `data.attrs['problem_info']` (JSON, LIBERO's layout)."""
    raw = data.attrs.get('problem_info')
    if raw is None:
        raise ValueError(f'{path}: data has no "problem_info" attribute (expected JSON with '
                         '"language_instruction", as LIBERO writes it)')
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        language = info['language_instruction']
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f'{path}: problem_info is not JSON with "language_instruction" '
                         f'({type(exc).__name__}: {exc})') from exc
    # LIBERO's own loader joins it: some files store the sentence as a list of pieces.
    text = ''.join(language) if isinstance(language, list) else str(language)
    if not text.strip():
        raise ValueError(f'{path}: problem_info language_instruction is empty')
    return text.strip()


def read_episodes(paths: list[str | Path], action_dim: int = 7,
                  proprio: bool = False) -> list[Episode]:
    """Validate LIBERO HDF5 demo files and read their actions, instructions and (proprio) the
    robot state of PROPRIO_DATASETS (no frames).

    Raises ValueError naming the file and what is wrong: unreadable, missing groups or
    datasets, wrong shapes, frame count != action count, NaN actions or states, no instruction.
    """
    episodes = []
    for path in find_demo_files(paths):
        with open_demo_file(path) as stream:
            data, names = demo_groups(path, stream,
                                      'data/demo_<i>/{actions, obs/agentview_rgb}')
            instruction = _instruction(path, data)
            for name in names:
                episodes.append(_read_episode(path, data[name], name, instruction, action_dim,
                                              proprio))
    logger.info('%d episodes, %d frames from %d file(s)', len(episodes),
                sum(e.length for e in episodes), len({e.file for e in episodes}))
    return episodes


def _read_episode(path: Path, group: h5py.Group, name: str, instruction: str,
                  action_dim: int, proprio: bool) -> Episode:
    where = f'{path}: data/{name}'
    actions = read_actions(where, group, action_dim)
    frames = group.get(f'obs/{CAMERA}')
    if not isinstance(frames, h5py.Dataset):
        raise ValueError(f'{where} has no obs/{CAMERA} dataset (the agent-view camera)')
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f'{where}/obs/{CAMERA} is {frames.dtype} {list(frames.shape)}, '
                         'expected uint8 [N, H, W, 3]')
    if frames.shape[0] != len(actions):
        raise ValueError(f'{where}: {frames.shape[0]} frames but {len(actions)} actions')
    state = _read_state(where, group, len(actions)) if proprio else None
    return Episode(path, name, instruction, actions, state)


def _read_state(where: str, group: h5py.Group, length: int) -> np.ndarray:
    """PROPRIO_DATASETS of one demo, concatenated: [N, P] float32."""
    parts = []
    for name in PROPRIO_DATASETS:
        values = group.get(f'obs/{name}')
        if not isinstance(values, h5py.Dataset):
            raise ValueError(f'{where} has no obs/{name} dataset (proprioception reads '
                             f'{", ".join(PROPRIO_DATASETS)}; train without it: --no-proprio)')
        if values.ndim != 2 or values.shape[0] != length:
            raise ValueError(f'{where}/obs/{name} has shape {list(values.shape)}, expected '
                             f'[{length}, n]')
        parts.append(np.asarray(values, dtype=np.float32))
    state = np.concatenate(parts, axis=1)
    if state.shape[1] != len(PROPRIO_NAMES):
        raise ValueError(f'{where}: {state.shape[1]} state values in {PROPRIO_DATASETS}, '
                         f'expected {len(PROPRIO_NAMES)} ({", ".join(PROPRIO_NAMES)})')
    if not np.isfinite(state).all():
        raise ValueError(f'{where}: non-finite values in {PROPRIO_DATASETS}')
    return state


def split_episodes(episodes: list[Episode], fraction: float,
                   seed: int) -> tuple[list[int], list[int]]:
    """Episode indices (train, held-out). Per instruction, round(fraction x its episodes) are
    held out (at least one episode overall when fraction > 0 and there are two or more)."""
    rng = np.random.default_rng([seed, 1])
    by_task = defaultdict(list)
    for index, episode in enumerate(episodes):
        by_task[episode.instruction].append(index)
    held = []
    for indices in by_task.values():
        count = min(len(indices) - 1, round(fraction * len(indices)))
        held += [int(i) for i in rng.permutation(indices)[:max(count, 0)]]
    if fraction > 0 and not held and len(episodes) > 1:
        held = [int(rng.integers(len(episodes)))]
    held = sorted(held)
    return [i for i in range(len(episodes)) if i not in set(held)], held


def demo_provenance(episodes: list[Episode]) -> list[dict]:
    """[{path, sha256, episodes, frames}] per demo file."""
    files = defaultdict(list)
    for episode in episodes:
        files[episode.file].append(episode.length)
    return [{'path': str(path.resolve()), 'sha256': file_sha256(path),
             'episodes': len(lengths), 'frames': int(sum(lengths))}
            for path, lengths in files.items()]


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


# ---------------------------------------------------------------- augmentation

def augment_images(images: torch.Tensor, generator: torch.Generator, min_crop: float = 0.9,
                   jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop (square, side fraction min_crop..1 of the image, anywhere inside it,
    resized back) and brightness / contrast / saturation jitter (factors 1 +- jitter).

    images [B, S, S, 3] uint8 -> [B, S, S, 3] uint8.
    """
    batch = images.shape[0]
    x = images.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, S, S]
    scale = torch.empty(batch).uniform_(min_crop, 1.0, generator=generator)  # [B]
    room = 1.0 - scale
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * room[:, None]  # [B, 2]
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, S, S, 2]
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    factors = 1 + (torch.rand(batch, 3, 1, 1, 1, generator=generator) * 2 - 1) * jitter
    x = x * factors[:, 0]  # brightness
    grey = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    x = grey + (x - grey) * factors[:, 1]  # contrast
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # [B, 1, S, S]
    x = luma + (x - luma) * factors[:, 2]  # saturation
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # [B, S, S, 3]


# ---------------------------------------------------------------- samples and batches

class DemoData:
    """Samples (episode, t) with their target codes, batched by prompt length.

    codes: [n, L, C] uint8, the tokenizer's codes of every sample's action chunk, encoded once
    in fixed batches (late layers are at float rounding level and would flicker otherwise).
    """

    def __init__(self, episodes: list[Episode], model: MainModel, tokenizer: ActionTokenizer,
                 frames: FrameReader):
        self.episodes, self.frames, self.processor = episodes, frames, model.processor
        self.chunk_len = tokenizer.config.chunk_len
        lengths = [e.length for e in episodes]
        self.episode = np.repeat(np.arange(len(episodes)), lengths)  # [n]
        self.t = np.concatenate([np.arange(n) for n in lengths])  # [n]
        chunks = np.concatenate([episode_chunks(e.actions, self.chunk_len) for e in episodes])
        self.chunks = chunks  # [n, T, A] float32, action units
        self.codes = encode_chunks(tokenizer, chunks)  # [n, L, C] uint8
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


# ---------------------------------------------------------------- model forward and metrics

def teacher_forced_logits(model: MainModel, inputs: dict, codes: torch.Tensor) -> torch.Tensor:
    """ONE causal forward over [prompt, layers 0..L-2] -> logits of layers 0..L-1 [B, L, C, V].

    codes [B, L, C] long (the targets; layers 0..L-2 are fed). The prompt positions are exactly
    those of `MainModel.prefill` (`embed_prompt`); position ids run on from the prompt as in
    `MainModel.forward_layers`.
    """
    prompt, pixel_values = model.embed_prompt(inputs)  # [B, S', H]
    codes = codes.to(model.device)
    layers = model.layer_embedding(codes[:, :-1], first_layer=0)  # [B, L-1, H]
    embeds = torch.cat([prompt, layers.to(prompt.dtype)], dim=1)  # [B, S'+L-1, H]
    batch, length = embeds.shape[:2]
    positions = torch.arange(length, device=model.device).expand(batch, length)
    out = model.backbone.model(inputs_embeds=embeds, pixel_values=pixel_values,
                               position_ids=positions, use_cache=False)
    hidden = out.last_hidden_state[:, prompt.shape[1] - 1:]  # [B, L, H]
    return model.rfsq_head(hidden)  # [B, L, C, V]


def layer_losses(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per layer [L] of logits [B, L, C, V] against codes [B, L, C]."""
    loss = F.cross_entropy(logits.flatten(0, 2).float(), codes.flatten(), reduction='none')
    return loss.view(codes.shape).mean(dim=(0, 2))


@torch.no_grad()
def greedy_codes(model: MainModel, inputs: dict) -> torch.Tensor:
    """Main-only greedy decoding, as the engine without a draft: codes [B, L, C]."""
    cache, _, logits = model.prefill(inputs)  # logits: [B, C, V]
    codes = [logits.argmax(-1)]
    for layer in range(model.num_layers - 1):
        logits, _ = model.forward_layers(cache, codes[-1][:, None], first_layer=layer)
        codes.append(logits[:, 0].argmax(-1))
    return torch.stack(codes, dim=1)  # [B, L, C]


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """Mixed-precision context of the forward pass (none for float32)."""
    compute = AUTOCAST_DTYPES[dtype]
    if compute is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


@torch.no_grad()
def evaluate(model: MainModel, tokenizer: ActionTokenizer, data: DemoData,
             batches: list[np.ndarray], dtype: str = 'float32') -> dict:
    """Held-out metrics without augmentation: teacher-forced loss and token accuracy per layer,
    and the action L1 error (action units) of greedy decoding against the demo chunks."""
    was_training = model.training
    model.eval()
    losses, correct, errors, count = 0.0, 0.0, [], 0
    with autocast(model.device, dtype):
        for indices in batches:
            inputs, codes = data.batch(indices)
            codes = codes.to(model.device)
            logits = teacher_forced_logits(model, inputs, codes)  # [B, L, C, V]
            losses = losses + layer_losses(logits, codes) * len(indices)
            correct = correct + (logits.argmax(-1) == codes).float().mean(-1).sum(0)  # [L]
            tokens = codes_to_tokens(greedy_codes(model, inputs), tokenizer.config.latent_dim)
            actions = tokenizer.decode(tokens)  # [B, T, A]
            target = torch.from_numpy(data.chunks[indices]).to(actions.device)  # [B, T, A]
            errors.append((actions.float() - target).abs().cpu())
            count += len(indices)
    model.train(was_training)
    error = torch.cat(errors)  # [n, T, A]
    return {'samples': count, 'loss': float((losses / count).mean()),
            'layer_loss': (losses / count).tolist(), 'token_accuracy': (correct / count).tolist(),
            'action_l1': float(error.mean()), 'action_l1_per_dim': error.mean((0, 1)).tolist()}


@torch.no_grad()
def baselines(tokenizer: ActionTokenizer, data: DemoData, train: np.ndarray,
              held: np.ndarray) -> dict:
    """Reference points on held-out samples: the tokenizer's reconstruction floor (all layers),
    the L1 error of always predicting the mean training chunk, and the token accuracy per layer
    of always predicting each code's most frequent training value."""
    chunks = torch.from_numpy(data.chunks[held])  # [n, T, A]
    codes = torch.from_numpy(data.codes[held]).long()  # [n, L, C]
    tokens = codes_to_tokens(codes, tokenizer.config.latent_dim)  # [n, L, T, D]
    floor = tokenizer.decode(tokens).cpu() - chunks
    mean_chunk = torch.from_numpy(data.chunks[train].mean(0))  # [T, A]
    levels = tokenizer.config.levels
    counts = F.one_hot(torch.from_numpy(data.codes[train]).long(), levels).sum(0)  # [L, C, V]
    constant = (codes == counts.argmax(-1)).float().mean(dim=(0, 2))  # [L]
    return {'tokenizer_floor_l1': float(floor.abs().mean()),
            'mean_chunk_l1': float((mean_chunk - chunks).abs().mean()),
            'constant_guess_accuracy': constant.tolist()}


# ---------------------------------------------------------------- optimisation

def trainable(model: MainModel) -> dict[str, torch.nn.Parameter]:
    """Parameters that train, by name (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: MainModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not on biases, norms or embeddings)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(trainable(model).values())
    decay = [p for p in params if p.ndim >= 2 and id(p) not in tables]
    rest = [p for p in params if not (p.ndim >= 2 and id(p) not in tables)]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                              {'params': rest, 'weight_decay': 0.0}], lr=lr)


def optimizer_tensors(model: MainModel, optimizer: torch.optim.Optimizer,
                      ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as safetensors-ready tensors '<param name>/<key>' + JSON param groups."""
    names = {id(p): n for n, p in trainable(model).items()}
    state = optimizer.state_dict()
    order = [p for group in optimizer.param_groups for p in group['params']]
    tensors = {f'{names[id(order[i])]}/{key}': value
               for i, values in state['state'].items() for key, value in values.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in state['param_groups']]
    return tensors, groups


def load_optimizer(model: MainModel, optimizer: torch.optim.Optimizer,
                   tensors: dict[str, torch.Tensor], groups: list[dict], where: str) -> None:
    """Inverse of `optimizer_tensors`; CheckpointError when the parameters do not match."""
    position = {id(p): i for i, p in
                enumerate(p for group in optimizer.param_groups for p in group['params'])}
    index = {n: position[id(p)] for n, p in trainable(model).items()}
    state = defaultdict(dict)
    for key, value in tensors.items():
        name, _, slot = key.rpartition('/')
        if name not in index:
            raise CheckpointError(f'{where}: optimizer state for unknown parameter {name!r}')
        state[index[name]][slot] = value
    if len(groups) != len(optimizer.param_groups) or any(
            len(g['params']) != len(h['params']) for g, h in
            zip(groups, optimizer.param_groups, strict=True)):
        raise CheckpointError(f'{where}: optimizer parameter groups do not match the model')
    groups = [{k: tuple(v) if k == 'betas' else v for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({'state': dict(state), 'param_groups': groups})


# ---------------------------------------------------------------- checkpoints

def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints <out>/checkpoint/step-<N> (with state.json), oldest first."""
    root = out / 'checkpoint'
    found = [p for p in root.glob('step-*') if (p / 'state.json').is_file()] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix('step-')))


def save_checkpoint(out: Path, model: MainModel, optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:
    """Write <out>/checkpoint/step-<N> (staged, then renamed) and drop older ones."""
    root = out / 'checkpoint'
    final = root / f'step-{state["step"]:08d}'
    staging = Path(tempfile.mkdtemp(prefix='.staging-', dir=root))
    try:
        params = {n: p.detach() for n, p in trainable(model).items()}
        save_component(staging, 'model', params, {'format': 'rsd-train-policy-model'})
        tensors, groups = optimizer_tensors(model, optimizer)
        save_component(staging, 'optimizer', tensors, {'format': 'rsd-train-policy-optimizer',
                                                       'param_groups': groups})
        state = dict(state, format=STATE_FORMAT, version=STATE_VERSION)
        (staging / 'state.json').write_text(json.dumps(state, indent=2, sort_keys=True) + '\n')
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-1]:
        shutil.rmtree(old)
    return final


def load_checkpoint(directory: Path, model: MainModel,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters and optimizer state from a step-<N> directory; return its state."""
    state = load_manifest(directory / 'state.json', STATE_FORMAT)
    if state.get('version') != STATE_VERSION:
        raise CheckpointError(f'{directory}/state.json: version {state.get("version")!r}, '
                              f'this code reads {STATE_VERSION}')
    params = trainable(model)
    tensors = load_tensors(directory / 'model.safetensors')
    check_state_dict(tensors, params, str(directory / 'model'))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    manifest = load_manifest(directory / 'optimizer.json', 'rsd-train-policy-optimizer')
    load_optimizer(model, optimizer, load_tensors(directory / 'optimizer.safetensors'),
                   manifest['param_groups'], str(directory))
    return state


# ---------------------------------------------------------------- bundle and observations

def write_observations(frames: FrameReader, samples: list[tuple[int, int]],
                       directory: Path) -> Path:
    """An observation directory (index.jsonl + images/*.png, upright, stored size) of the given
    (episode, t) frames, for draft distillation."""
    (directory / 'images').mkdir(parents=True, exist_ok=True)
    lines = []
    for number, (episode, t) in enumerate(samples):
        name = f'images/{number:06d}.png'
        Image.fromarray(frames.raw(episode, t)).save(directory / name)
        info = frames.episodes[episode]
        entry = {'image': name, 'instruction': info.instruction, 'source': str(info.file),
                 'demo': info.demo, 'step': t}
        if info.proprio is not None:
            entry['proprio'] = [float(v) for v in info.proprio[t]]
        lines.append(json.dumps(entry))
    (directory / 'index.jsonl').write_text('\n'.join(lines) + '\n')
    return directory


# ---------------------------------------------------------------- the training run

@dataclass
class Run:
    """Everything one training run holds."""

    config: TrainPolicyConfig
    out: Path
    model: MainModel
    tokenizer: ActionTokenizer
    episodes: list[Episode]
    frames: FrameReader
    data: DemoData
    train_episodes: list[int]
    held_episodes: list[int]
    demos: list[dict]
    action_names: list[str]
    control_period: float
    source: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def identity(config: TrainPolicyConfig, demos: list[dict]) -> dict:
    """What a resumed run must share with the run it continues (RESUME_KEYS)."""
    return {'demos': [d['sha256'] for d in demos],
            'init': str(Path(config.init).resolve()) if config.init else None,
            'preset': None if config.init else config.preset, 'seed': config.seed,
            'heldout_fraction': config.heldout_fraction, 'freeze_vision': config.freeze_vision,
            'proprio': config.proprio}


def build_model(config: TrainPolicyConfig, tokenizer_config: TokenizerConfig,
                ) -> tuple[MainModel, list[str], float, dict]:
    """The model to train: the --init bundle, or a new preset model. Returns (model, action
    names, control period, source description)."""
    if config.init:
        manifest = load_bundle_manifest(config.init)
        model = MainModel.from_dir(config.init, device=config.device, dtype=torch.float32)
        source = {'init': str(Path(config.init).resolve()),
                  'init_weights_sha256': manifest['weights_sha256']}
        return model, manifest['action_names'], manifest['control_period_s'], source
    model = new_main_model(config.preset, config.seed, tokenizer_config.num_layers,
                           tokenizer_config.codes_per_layer, tokenizer_config.levels)
    source = {'preset': config.preset, 'backbone_sizes': asdict(PRESETS[config.preset])}
    return model, list(DEFAULT_ACTION_NAMES), 0.05, source


def get_tokenizer(config: TrainPolicyConfig, out: Path, episodes: list[Episode],
                  train_episodes: list[int], resuming: bool) -> ActionTokenizer:
    """Resume: the checkpoint's tokenizer; --tokenizer DIR; else fitted on the training
    episodes' chunks. Saved to <out>/checkpoint/action_tokenizer."""
    saved = out / 'checkpoint' / 'action_tokenizer'
    if resuming:
        return ActionTokenizer.load(saved)
    if config.tokenizer:
        tokenizer = ActionTokenizer.load(config.tokenizer)
    else:
        chunk_len = TokenizerConfig().chunk_len
        chunks = np.concatenate([episode_chunks(episodes[i].actions, chunk_len)
                                 for i in train_episodes])
        files = sorted({str(episodes[i].file) for i in train_episodes})
        tokenizer, _ = fit_tokenizer(chunks, steps=config.tokenizer_steps, seed=config.seed,
                                     progress=config.progress, num_threads=config.threads,
                                     source=f'demos (training episodes): {", ".join(files)}')
    tokenizer.save(saved)
    return tokenizer


def set_proprio(model: MainModel, proprio: bool, episodes: list[Episode],
                train_episodes: list[int]) -> None:
    """Give the model a new proprioception input standardised with the training episodes'
    state statistics (kept as it is when the --init model has one), or refuse a mismatch."""
    if not proprio:
        if model.proprio is not None:
            raise ValueError(f'the --init model takes proprioception '
                             f'({", ".join(model.proprio_names)}); drop --no-proprio')
        return
    if model.proprio is not None:
        if model.proprio_names != PROPRIO_NAMES:
            raise ValueError(f'the --init model reads proprio {list(model.proprio_names)}, the '
                             f'demos give {list(PROPRIO_NAMES)}')
        return                          # fine-tuning keeps the statistics it was trained with
    model.add_proprio(PROPRIO_NAMES)
    states = torch.from_numpy(np.concatenate([episodes[i].proprio for i in train_episodes]))
    model.proprio.set_statistics(states.mean(0), states.std(0))  # [P] each


def check_compatible(model: MainModel, tokenizer: ActionTokenizer, action_dim: int) -> None:
    """ValueError unless the tokenizer's (L, C, V) match the model's heads and its action
    dims the demos'."""
    cfg = tokenizer.config
    found = (cfg.num_layers, cfg.codes_per_layer, cfg.levels)
    wanted = (model.num_layers, model.codes_per_layer, model.levels)
    if found != wanted:
        raise ValueError(f"action tokenizer (L, C, V) = {found} does not match the model's "
                         f'heads {wanted}; pass a matching --tokenizer')
    if cfg.action_dim != action_dim:
        raise ValueError(f'action tokenizer has {cfg.action_dim} action dims, the demos '
                         f'{action_dim}')


def prepare(config: TrainPolicyConfig) -> tuple[Run, Path | None]:
    """Read the demos, get the tokenizer and the model; returns the run and the checkpoint to
    resume from (None for a new run)."""
    out = Path(config.out)
    checkpoints = checkpoint_dirs(out) if config.resume else []
    if not config.resume and out.exists() and any(out.iterdir()):
        raise ValueError(f'{out}: not empty; continue a run with --resume or choose a new '
                         'directory')
    episodes = read_episodes(config.demos, proprio=config.proprio)
    demos = demo_provenance(episodes)
    (out / 'checkpoint').mkdir(parents=True, exist_ok=True)
    if checkpoints:
        saved = json.loads((checkpoints[-1] / 'state.json').read_text()).get('identity', {})
        wanted = identity(config, demos)
        saved = {**LATER_KEYS, **saved}
        changed = [f'{k} {saved.get(k)!r} -> {wanted[k]!r}' for k in RESUME_KEYS
                   if saved.get(k) != wanted[k]]
        if changed:
            raise ValueError(f'{checkpoints[-1]}: cannot resume, these differ from the saved '
                             f'run: {"; ".join(changed)}')
    elif config.resume and (out / MANIFEST).is_file():
        raise ValueError(f'{out}: holds a bundle but no training checkpoint to resume; '
                         'refusing to overwrite it')
    elif config.resume:
        logger.info('%s: no checkpoint to resume; starting a new run', out)
    train_ep, held_ep = split_episodes(episodes, config.heldout_fraction, config.seed)
    tokenizer = get_tokenizer(config, out, episodes, train_ep, bool(checkpoints))
    model, names, period, source = build_model(config, tokenizer.config)
    check_compatible(model, tokenizer, episodes[0].actions.shape[1])
    set_proprio(model, config.proprio, episodes, train_ep)
    frames = FrameReader(episodes, model.processor.image_size, config.cache_mb)
    data = DemoData(episodes, model, tokenizer, frames)
    run = Run(config, out, model, tokenizer, episodes, frames, data, train_ep, held_ep, demos,
              names, period, source)
    return run, checkpoints[-1] if checkpoints else None


def train_step(run: Run, optimizer: torch.optim.Optimizer, train_pool: np.ndarray,
               warmup: int) -> tuple[float, torch.Tensor]:
    """One optimiser step (grad_accum micro-batches) at run.step; returns (loss, per-layer
    token accuracy [L]) of the step's batches."""
    config, model = run.config, run.model
    lr = learning_rate(run.step, config.steps, config.lr, warmup)
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    total, accuracy = 0.0, 0.0
    for micro in range(config.grad_accum):
        seeds = [config.seed, run.step, micro]
        indices = run.data.draw(train_pool, config.batch_size, np.random.default_rng(seeds))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seeds)
                                                      .generate_state(1)[0]))
        inputs, codes = run.data.batch(indices, generator if config.augment else None)
        codes = codes.to(model.device)
        with autocast(model.device, config.dtype):
            logits = teacher_forced_logits(model, inputs, codes)  # [B, L, C, V]
        loss = layer_losses(logits, codes).mean()
        (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
        with torch.no_grad():
            accuracy = accuracy + (logits.argmax(-1) == codes).float().mean(dim=(0, 2)) \
                / config.grad_accum
    torch.nn.utils.clip_grad_norm_(list(trainable(model).values()), config.grad_clip)
    optimizer.step()
    return total, accuracy.cpu()


def train_loop(run: Run, optimizer: torch.optim.Optimizer, eval_batches: list[np.ndarray],
               ) -> None:
    """Steps run.step..steps-1 with periodic held-out evaluation and checkpoints."""
    config = run.config
    warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 20
    train_pool = run.data.samples_of(run.train_episodes)
    losses, accuracies = [], []
    end = min(config.steps, config.stop_after or config.steps)
    run.model.train()
    bar = tqdm(total=config.steps, initial=run.step, desc='train policy', file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True)
    while run.step < end:
        started = time.perf_counter()
        loss, accuracy = train_step(run, optimizer, train_pool, warmup)
        run.step_seconds.append(time.perf_counter() - started)
        if not math.isfinite(loss):
            raise RuntimeError(f'training loss became {loss} at step {run.step}; lower --lr or '
                               'use --dtype float32')
        losses.append(loss)
        accuracies.append(accuracy)
        run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f'{loss:.3f}', acc0=f'{float(accuracy[0]):.2f}')
        done = run.step == config.steps
        if run.step % config.eval_every == 0 or done:
            record = {'step': run.step, 'lr': learning_rate(run.step - 1, config.steps,
                                                             config.lr, warmup),
                      'train_loss': float(np.mean(losses)),
                      'train_token_accuracy': torch.stack(accuracies).mean(0).tolist(),
                      'seconds_per_step': float(np.median(run.step_seconds[-len(losses):]))}
            if eval_batches:
                record['held_out'] = evaluate(run.model, run.tokenizer, run.data, eval_batches,
                                              config.dtype)
            run.history.append(record)
            logger.info('step %d: %s', run.step, summary_line(record))
            losses, accuracies = [], []
        if run.step % config.save_every == 0 or run.step == end:
            save_checkpoint(run.out, run.model, optimizer, run_state(run))
    bar.close()


def run_state(run: Run) -> dict:
    """The state.json content of a checkpoint: step, resume identity, settings, history."""
    config = {k: v for k, v in asdict(run.config).items() if k != 'progress'}
    return {'step': run.step, 'identity': identity(run.config, run.demos), 'config': config,
            'history': run.history, 'step_seconds': run.step_seconds[-1000:]}


def summary_line(record: dict) -> str:
    """One evaluation record (train and held-out loss, accuracy, action L1) as one line."""
    line = (f'train loss {record["train_loss"]:.4f}, layer-0 acc '
            f'{record["train_token_accuracy"][0]:.3f}')
    held = record.get('held_out')
    if held:
        line += (f'; held-out loss {held["loss"]:.4f}, token acc '
                 + ' '.join(f'{a:.2f}' for a in held['token_accuracy'])
                 + f', action L1 {held["action_l1"]:.4f}')
    return line


def train_policy(config: TrainPolicyConfig) -> dict:
    """Behaviour-clone the main model on demos; write the bundle (and draft) to config.out.

    Returns the metrics: history (per evaluation), final held-out metrics, baselines, median
    seconds per step, bundle weights hash, draft metrics (when distilled).
    """
    config.check()
    device = torch.device(config.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} requested but CUDA is not available here')
    with torch_threads(config.threads), tempfile.TemporaryDirectory(prefix='rsd-bc-') as tmp:
        run, resume_from = prepare(config)
        try:
            return _train_and_save(run, resume_from, device, Path(tmp))
        finally:
            run.frames.close()


def _train_and_save(run: Run, resume_from: Path | None, device: torch.device,
                    scratch: Path) -> dict:
    config, model = run.config, run.model
    model.to(device).train().requires_grad_(True)
    if config.freeze_vision:
        model.backbone.model.vision_tower.requires_grad_(False)
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable()
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        run.step, run.history = int(state['step']), list(state.get('history', []))
        run.step_seconds = list(state.get('step_seconds', []))
        if run.step > config.steps:
            raise ValueError(f'{resume_from}: checkpoint at step {run.step} is past --steps '
                             f'{config.steps}')
        changed = {k: (v, getattr(config, k)) for k, v in state.get('config', {}).items()
                   if k not in ('resume', 'steps', 'stop_after') and hasattr(config, k)
                   and v != getattr(config, k)}
        if changed:
            logger.warning('resuming with changed settings: %s', ', '.join(
                f'{k} {old!r} -> {new!r}' for k, (old, new) in changed.items()))
        logger.info('resumed from %s at step %d', resume_from, run.step)
    train_pool = run.data.samples_of(run.train_episodes)
    held_pool = run.data.samples_of(run.held_episodes)
    eval_batches = run.data.eval_batches(held_pool, config.eval_samples, config.batch_size) \
        if len(held_pool) else []
    logger.info('%d training samples (%d episodes), %d held-out (%d episodes); %d parameters '
                'trained', len(train_pool), len(run.train_episodes), len(held_pool),
                len(run.held_episodes), sum(p.numel() for p in trainable(model).values()))
    train_loop(run, optimizer, eval_batches)
    if run.step < config.steps:
        logger.info('stopped at step %d of %d (checkpointed); continue with --resume',
                    run.step, config.steps)
        return {'steps': run.step, 'stopped': True, 'history': run.history,
                'seconds_per_step': float(np.median(run.step_seconds))}
    if config.gradient_checkpointing:
        model.backbone.activation_checkpointing_disable()
    model.eval()
    metrics = final_metrics(run, train_pool, held_pool)
    weights = write_bundle(model.cpu().float(), run.tokenizer, run.out, run.action_names,
                           run.control_period, provenance(run, metrics))
    make_readable(run.out)
    metrics['weights_sha256'] = weights
    logger.info('bundle written to %s (weights %s)', run.out, weights[:12])
    if config.distill_draft:
        metrics['draft'] = distill(run, scratch / 'observations')
    return metrics


def final_metrics(run: Run, train_pool: np.ndarray, held_pool: np.ndarray) -> dict:
    """Metrics of a finished run: history, last evaluation, sample counts, baselines."""
    last = run.history[-1] if run.history else {}
    seconds = run.step_seconds
    metrics = {'steps': run.step, 'history': run.history,
               'train_samples': len(train_pool), 'held_out_samples': len(held_pool),
               'train_episodes': len(run.train_episodes),
               'held_out_episodes': len(run.held_episodes),
               'seconds_per_step': float(np.median(seconds)) if seconds else None,
               'final': {k: v for k, v in last.items() if k != 'lr'}}
    if len(held_pool):
        metrics['baselines'] = baselines(run.tokenizer, run.data, train_pool, held_pool)
    return metrics


def provenance(run: Run, metrics: dict) -> dict:
    """The bundle manifest's provenance: model source, seed, settings, demos, metrics."""
    config = run.config
    settings = {k: getattr(config, k) for k in (
        'steps', 'batch_size', 'grad_accum', 'lr', 'weight_decay', 'warmup_steps', 'grad_clip',
        'dtype', 'heldout_fraction', 'augment', 'freeze_vision')}
    return {'weights': WEIGHTS, **run.source,
            'seed': config.seed, 'training': settings,
            'demos': run.demos,
            'action_tokenizer': {'path': config.tokenizer or 'fitted on the training episodes',
                                 'source': run.tokenizer.training_info.get('source')},
            'metrics': {k: v for k, v in metrics.items() if k != 'history'}}


def distill(run: Run, observations: Path) -> dict:
    """Distil the default draft into <out>/draft on frames of the demos."""
    config = run.config
    rng = np.random.default_rng([config.seed, 2])
    total = len(run.data)
    picks = np.sort(rng.choice(total, size=min(config.draft_observations, total), replace=False))
    samples = [(int(run.data.episode[i]), int(run.data.t[i])) for i in picks]
    write_observations(run.frames, samples, observations)
    metrics = distill_draft(run.out, observations, run.out / 'draft',
                            samples=config.draft_samples, epochs=config.draft_epochs,
                            seed=config.seed, progress=config.progress, device=config.device)
    logger.info('draft: %s', draft_summary(metrics))
    return {k: v for k, v in metrics.items() if k != 'history'}


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd train-policy` options."""
    defaults = TrainPolicyConfig(demos=[], out='')
    parser.add_argument('--demos', nargs='+', required=True, metavar='PATH',
                        help='LIBERO HDF5 demo files, or directories of them')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='output bundle directory (checkpoints in <out>/checkpoint)')
    parser.add_argument('--init', default=None, metavar='DIR',
                        help='existing bundle to fine-tune (e.g. a larger LLaVA-style '
                             'backbone on a GPU) instead of a new preset model')
    parser.add_argument('--preset', default=None, choices=sorted(PRESETS),
                        help='size of a new model (default: default; not with --init)')
    parser.add_argument('--tokenizer', default=None, metavar='DIR',
                        help='action tokenizer directory (default: fit one on the demos)')
    parser.add_argument('--tokenizer-steps', type=int, default=defaults.tokenizer_steps,
                        help='training steps when fitting the action tokenizer here')
    parser.add_argument('--steps', type=int, default=defaults.steps, help='optimiser steps')
    parser.add_argument('--stop-after', type=int, default=None, metavar='STEP',
                        help='end this session at STEP with a checkpoint, without writing the '
                             'bundle (continue later with --resume)')
    parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
    parser.add_argument('--grad-accum', type=int, default=defaults.grad_accum,
                        help='micro-batches per optimiser step')
    parser.add_argument('--lr', type=float, default=defaults.lr, help='peak learning rate')
    parser.add_argument('--weight-decay', type=float, default=defaults.weight_decay)
    parser.add_argument('--warmup-steps', type=int, default=None,
                        help='linear warm-up steps (default: 5%% of --steps)')
    parser.add_argument('--grad-clip', type=float, default=defaults.grad_clip,
                        help='gradient norm clip')
    parser.add_argument('--device', default=defaults.device, help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--dtype', default=defaults.dtype, choices=sorted(AUTOCAST_DTYPES),
                        help='compute dtype (autocast); weights and optimizer stay float32')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--resume', action='store_true',
                        help='continue from the last checkpoint in <out>/checkpoint')
    parser.add_argument('--heldout-fraction', type=float, default=defaults.heldout_fraction,
                        help="fraction of each task's episodes held out for evaluation")
    parser.add_argument('--augment', action=argparse.BooleanOptionalAction,
                        default=defaults.augment,
                        help='random resized crop and colour jitter on training images')
    parser.add_argument('--eval-every', type=int, default=defaults.eval_every)
    parser.add_argument('--eval-samples', type=int, default=defaults.eval_samples,
                        help='held-out samples per evaluation')
    parser.add_argument('--save-every', type=int, default=defaults.save_every,
                        help='checkpoint interval in steps')
    parser.add_argument('--cache-mb', type=float, default=defaults.cache_mb,
                        help='memory for decoded frames (uint8 at the model image size)')
    parser.add_argument('--freeze-vision', action='store_true',
                        help='do not train the vision tower')
    parser.add_argument('--proprio', action=argparse.BooleanOptionalAction,
                        default=defaults.proprio,
                        help='condition on the robot state: obs/joint_states + '
                             'obs/gripper_states (the JointState on joint_states at run time)')
    parser.add_argument('--gradient-checkpointing', action='store_true',
                        help='recompute activations in the backward pass (less memory)')
    parser.add_argument('--distill-draft', action=argparse.BooleanOptionalAction,
                        default=defaults.distill_draft,
                        help='distil the default draft into <out>/draft afterwards')
    parser.add_argument('--draft-observations', type=int, default=defaults.draft_observations,
                        help='demo frames used as draft observations')
    parser.add_argument('--draft-samples', type=int, default=defaults.draft_samples)
    parser.add_argument('--draft-epochs', type=int, default=defaults.draft_epochs)
    parser.add_argument('--threads', type=int, default=defaults.threads,
                        help='torch CPU threads (1 on a shared machine)')
    parser.add_argument('--no-progress', dest='progress', action='store_false',
                        help='no progress bars')
    parser.add_argument('--json', action='store_true', help='print the metrics as JSON')


def config_from_args(args: argparse.Namespace) -> TrainPolicyConfig:
    """The run settings of parsed CLI arguments (ValueError for --init with --preset)."""
    if args.init and args.preset:
        raise ValueError('--preset builds a new model, --init fine-tunes an existing bundle: '
                         'give one of them')
    names = {f for f in TrainPolicyConfig.__dataclass_fields__} - {'preset'}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainPolicyConfig(preset=args.preset or 'default', **values)


def format_report(metrics: dict) -> str:
    """Final metrics as text: per-layer token accuracy, action L1, baselines, timing."""
    if metrics.get('stopped'):
        return f'stopped at step {metrics["steps"]}; continue with --resume'
    final = metrics.get('final', {})
    lines = [f'steps {metrics["steps"]}, {metrics["train_samples"]} training samples, '
             f'{metrics["held_out_samples"]} held-out; median '
             f'{metrics["seconds_per_step"] or 0:.3f} s/step']
    if final:
        lines.append('train token accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in final['train_token_accuracy']))
    held, base = final.get('held_out'), metrics.get('baselines')
    if held and base:
        lines.append('held-out token accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in held['token_accuracy']))
        lines.append('constant-guess accuracy per layer: '
                     + ' '.join(f'{a:.3f}' for a in base['constant_guess_accuracy']))
        lines.append(f'held-out action L1 (greedy decoding) {held["action_l1"]:.4f}; mean-chunk '
                     f'baseline {base["mean_chunk_l1"]:.4f}; tokenizer floor '
                     f'{base["tokenizer_floor_l1"]:.4f} (action units)')
    if 'draft' in metrics:
        lines.append(f'draft: {draft_summary(metrics["draft"])}')
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    """`rsd train-policy`: train, save the bundle, print the report; exit 1 on failure."""
    try:
        metrics = train_policy(config_from_args(args))
    except (ValueError, RuntimeError, OSError) as exc:
        logger.error('%s', exc)
        return 1
    print(json.dumps(metrics, indent=2) if args.json else format_report(metrics))
    return 0
