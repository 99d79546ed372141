"""The main model: a transformers LLaVA backbone + RFSQ head + layer embedding.

One code path for every backbone that loads as `LlavaForConditionalGeneration` (vision tower +
projector + causal LM: the shape of OpenVLA-style checkpoints, and of the built-in default).
Each residual RFSQ layer is ONE position of the language model's sequence:

    prefill(image, instruction[, proprio]) -> h0 = last hidden state of the prompt,
                                              layer 0 = head(h0)
    forward_layers(codes of layers l..l+k-1) -> hidden states whose head gives layers l+1..l+k

A model may take proprioception: the robot state (joint positions, as a JointState message
carries them, named in `proprio_names`) becomes one extra prompt position right after the image
tokens, `<s> <image> x N <state> prompt words`, through `ProprioEncoder`.

The KV cache is a transformers `DynamicCache`; `crop` rolls it back after a rejected proposal.
Models loaded with `from_dir` are in eval mode with gradients off (call `.train()` and
`.requires_grad_(True)` to fine-tune).
"""

from collections.abc import Iterator
from contextlib import contextmanager
import logging
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration

from rsd_core.bundle import load_bundle_manifest, verify_file_hashes
from rsd_core.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_manifest,
    load_tensors,
    non_finite_keys,
    save_component,
)
from rsd_core.cpu_features import EMULATED_BF16_WARNING, emulated_bfloat16
from rsd_core.processor import PromptProcessor

logger = logging.getLogger(__name__)

HEADS_NAME = 'heads'
HEADS_FORMAT = 'rsd-main-heads'
HEADS_VERSION = 1
DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'bfloat16': torch.bfloat16,
          'float16': torch.float16}


class PromptCache(DynamicCache):
    """The KV cache of one prefill; `pad` [B] long counts each row's left padding when the
    prompts of a batch had different lengths (None otherwise)."""

    pad: torch.Tensor | None = None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float64' | 'bfloat16' | 'float16' (or the torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f'unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}')


class RFSQHead(nn.Module):
    """Hidden state [..., H] -> logits of one RFSQ layer [..., C, V]."""

    def __init__(self, hidden_size: int, codes_per_layer: int = 128, levels: int = 7):
        super().__init__()
        self.codes_per_layer, self.levels = codes_per_layer, levels
        self.proj = nn.Linear(hidden_size, codes_per_layer * levels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., C, V]."""
        logits = self.proj(hidden)  # [..., C * V]
        return logits.unflatten(-1, (self.codes_per_layer, self.levels))  # [..., C, V]


class LayerEmbedding(nn.Module):
    """Codes of k consecutive RFSQ layers [B, k, C] -> k input embeddings [B, k, H].

    The one-hot codes (C * V values) go through one Linear; the layer index adds a learned
    embedding, so the model knows which residual layer each position holds.
    """

    def __init__(self, hidden_size: int, num_layers: int = 8, codes_per_layer: int = 128,
                 levels: int = 7):
        super().__init__()
        self.levels = levels
        self.codes = nn.Linear(codes_per_layer * levels, hidden_size)
        self.layer = nn.Embedding(num_layers, hidden_size)

    def forward(self, codes: torch.Tensor, first_layer: int) -> torch.Tensor:
        """codes [B, k, C] of layers first_layer.. -> embeddings [B, k, H]."""
        one_hot = F.one_hot(codes, self.levels).to(self.codes.weight.dtype)  # [B, k, C, V]
        x = self.codes(one_hot.flatten(-2))  # [B, k, H]
        layers = torch.arange(first_layer, first_layer + codes.shape[1], device=codes.device)
        return x + self.layer(layers)  # [B, k, H]


class ProprioEncoder(nn.Module):
    """Robot state [B, P] in its own units (rad, m) -> one input embedding [B, 1, H].

    The state is standardised with the training data's mean / std (buffers, saved with the
    weights), then a two-layer MLP maps it into the language model's embedding space.
    """

    def __init__(self, state_dim: int, hidden_size: int):
        super().__init__()
        self.register_buffer('mean', torch.zeros(state_dim))
        self.register_buffer('std', torch.ones(state_dim))
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardisation statistics [P] (std is floored at 1e-3 of the state's units)."""
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std).clamp_min(1e-3))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """state [B, P] -> embedding [B, 1, H]."""
        return self.net((state - self.mean) / self.std)[:, None]  # [B, 1, H]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars while loading (they would land in node logs)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class MainModel(nn.Module):
    """LLaVA backbone + RFSQ head + layer embedding; see the module docstring."""

    def __init__(self, backbone: nn.Module, processor: PromptProcessor, num_layers: int = 8,
                 codes_per_layer: int = 128, levels: int = 7, weights_hash: str = '',
                 proprio_names: tuple[str, ...] = ()):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.hidden_size = int(backbone.config.text_config.hidden_size)
        self.num_layers, self.codes_per_layer, self.levels = num_layers, codes_per_layer, levels
        self.weights_hash = weights_hash
        self.rfsq_head = RFSQHead(self.hidden_size, codes_per_layer, levels)
        self.layer_embedding = LayerEmbedding(self.hidden_size, num_layers, codes_per_layer,
                                              levels)
        self.proprio_names: tuple[str, ...] = ()
        self.proprio: ProprioEncoder | None = None
        if proprio_names:
            self.add_proprio(proprio_names)

    def add_proprio(self, names: tuple[str, ...] | list[str]) -> None:
        """Give the model a (new, untrained) proprioception input of the named state values."""
        names = tuple(str(n) for n in names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f'proprio names must be distinct and non-empty, got {names}')
        self.proprio_names = names
        self.proprio = ProprioEncoder(len(names), self.hidden_size).to(self.device, self.dtype)

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.rfsq_head.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.rfsq_head.proj.weight.dtype

    # -- inference ---------------------------------------------------------------------------

    def prefill(self, inputs: dict) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the prompt. inputs: {'input_ids' [B, S], 'pixel_values' [B, 3, I, I]} and, for a
        model with proprioception, 'proprio' [B, P] (the state values named in proprio_names).

        Returns (cache holding the prompt's S (+1 state) positions, h0 [B, H], logits of
        layer 0 [B, C, V]).
        """
        embeds, pixel_values, mask = self.embed_prompt(inputs)  # [B, S', H], .., [B, S']
        cache = PromptCache(config=self.backbone.config)
        padded = {}
        if mask is not None:       # left padding: masked, positions from each prompt's start
            cache.pad = (mask.shape[1] - mask.sum(dim=1)).to(self.device)  # [B]
            padded = {'attention_mask': mask,
                      'position_ids': (mask.cumsum(dim=1) - 1).clamp(min=0)}  # [B, S']
        out = self.backbone.model(inputs_embeds=embeds, pixel_values=pixel_values,
                                  past_key_values=cache, use_cache=True, **padded)
        h0 = out.last_hidden_state[:, -1]  # [B, H]
        return cache, h0, self.rfsq_head(h0)  # logits0: [B, C, V]

    def embed_prompt(self, inputs: dict,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validated inputs -> (prompt embeddings [B, S', H], pixel_values [B, 3, I, I],
        attention mask [B, S'] long of a left-padded batch, else None).

        S' = S, or S + 1 with the state embedding inserted after the image placeholders (after
        each row's padding). LLaVA finds the placeholders by comparing embeddings with the
        <image> embedding and puts the projected vision features there.
        """
        input_ids, pixel_values, state = self._check_inputs(inputs)
        mask = inputs.get('attention_mask')
        if mask is not None:
            mask = mask.to(self.device)                                   # [B, S]
            if mask.shape != input_ids.shape:
                raise ValueError(f'attention_mask {list(mask.shape)} does not match input_ids '
                                 f'{list(input_ids.shape)}')
            mask = None if bool(mask.all()) else mask
        embeds = self.backbone.model.get_input_embeddings()(input_ids)  # [B, S, H]
        if self.proprio is not None:
            pad = 0 if mask is None else (mask.shape[1] - mask.sum(dim=1))[:, None]  # [B, 1]
            at = pad + 1 + self.processor.num_image_tokens               # [B, 1] or int
            slot = torch.arange(embeds.shape[1] + 1, device=self.device)[None]  # [1, S + 1]
            source = (slot - (slot > at).long()).clamp(max=embeds.shape[1] - 1)
            source = source.expand(embeds.shape[0], -1)                  # [B, S + 1]
            embeds = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[2]))
            is_state = (slot == at)[..., None]                           # [B or 1, S + 1, 1]
            embeds = torch.where(is_state, self.proprio(state).to(embeds.dtype), embeds)
            if mask is not None:
                mask = torch.where(is_state[..., 0], 1, mask.gather(1, source))  # [B, S + 1]
        return embeds, pixel_values, mask

    def forward_layers(self, cache: DynamicCache, codes: torch.Tensor,
                       first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed layers first_layer..first_layer+k-1 (codes [B, k, C]) in ONE forward pass.

        Appends k positions to `cache`. Returns (logits [B, k, C, V] of layers
        first_layer+1..first_layer+k, hidden [B, k, H]).
        """
        codes = self._check_codes(codes, first_layer)
        batch, k = codes.shape[:2]
        past = self.cache_length(cache)
        embeds = self.layer_embedding(codes, first_layer)  # [B, k, H]
        positions = torch.arange(past, past + k, device=self.device).expand(batch, k)  # [B, k]
        padded = {}
        pad = getattr(cache, 'pad', None)                 # [B]: a left-padded prompt batch
        if pad is not None:
            slots = torch.arange(past + k, device=self.device)[None]          # [1, past + k]
            padded = {'attention_mask': (slots >= pad[:, None]).long()}      # [B, past + k]
            positions = positions - pad[:, None]
        out = self.backbone.model.language_model(inputs_embeds=embeds, past_key_values=cache,
                                                 position_ids=positions, use_cache=True,
                                                 **padded)
        hidden = out.last_hidden_state  # [B, k, H]
        return self.rfsq_head(hidden), hidden  # logits: [B, k, C, V]

    def crop(self, cache: DynamicCache, length: int) -> None:
        """Keep the first `length` positions of `cache` (transformers 5 crops by a negative
        count of positions to remove)."""
        current = self.cache_length(cache)
        if not 0 <= length <= current:
            raise ValueError(f'cannot crop a cache of {current} positions to {length}')
        if length < current:
            cache.crop(length - current)

    @staticmethod
    def cache_length(cache: DynamicCache) -> int:
        """Number of positions held by `cache`."""
        return int(cache.get_seq_length())

    def _check_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                   torch.Tensor | None]:
        missing = {'input_ids', 'pixel_values'} - set(inputs)
        if missing:
            raise ValueError(f'prefill inputs lack {sorted(missing)}; use model.processor(...)')
        input_ids = inputs['input_ids'].to(self.device)  # [B, S]
        pixel_values = inputs['pixel_values'].to(self.device, self.dtype)  # [B, 3, I, I]
        if input_ids.ndim != 2 or pixel_values.ndim != 4 or \
                input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f'expected input_ids [B, S] and pixel_values [B, 3, I, I], got '
                             f'{list(input_ids.shape)} and {list(pixel_values.shape)}')
        if self.proprio is None:
            return input_ids, pixel_values, None
        state = inputs.get('proprio')
        if state is None:
            raise ValueError(f'this model takes proprioception: inputs need proprio [B, '
                             f'{len(self.proprio_names)}] ({", ".join(self.proprio_names)})')
        state = torch.as_tensor(state).to(self.device, self.dtype)  # [B, P]
        if state.shape != (input_ids.shape[0], len(self.proprio_names)):
            raise ValueError(f'proprio has shape {list(state.shape)}; expected '
                             f'[{input_ids.shape[0]}, {len(self.proprio_names)}] '
                             f'({", ".join(self.proprio_names)})')
        if not bool(torch.isfinite(state).all()):
            raise ValueError('proprio contains NaN or Inf values')
        return input_ids, pixel_values, state

    def _check_codes(self, codes: torch.Tensor, first_layer: int) -> torch.Tensor:
        if codes.ndim != 3 or codes.shape[1] < 1 or codes.shape[2] != self.codes_per_layer:
            raise ValueError(f'codes have shape {list(codes.shape)}; expected [B, k >= 1, '
                             f'{self.codes_per_layer}]')
        if codes.dtype != torch.long:
            raise ValueError(f'codes have dtype {codes.dtype}; expected torch.long')
        if not 0 <= first_layer <= self.num_layers - codes.shape[1]:
            raise ValueError(f'layers {first_layer}..{first_layer + codes.shape[1] - 1} are '
                             f'outside 0..{self.num_layers - 1}')
        codes = codes.to(self.device)
        if int(codes.min()) < 0 or int(codes.max()) >= self.levels:
            raise ValueError(f'codes outside 0..{self.levels - 1}')
        return codes

    # -- persistence -------------------------------------------------------------------------

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of heads.safetensors: rfsq_head.*, layer_embedding.*, proprio.*."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(('rfsq_head.', 'layer_embedding.', 'proprio.'))}

    def heads_manifest(self) -> dict:
        """The heads.json content: format, version, the sizes H, L, C, V and the names of the
        proprioception inputs (empty: none)."""
        return {'format': HEADS_FORMAT, 'version': HEADS_VERSION,
                'hidden_size': self.hidden_size, 'num_layers': self.num_layers,
                'codes_per_layer': self.codes_per_layer, 'levels': self.levels,
                'proprio_names': list(self.proprio_names)}

    def save_heads(self, bundle_dir: str | Path) -> Path:
        """Write heads.safetensors + heads.json into `bundle_dir`; return the weights path."""
        return save_component(bundle_dir, HEADS_NAME, self.heads_state_dict(),
                              self.heads_manifest())

    def load_heads(self, bundle_dir: str | Path) -> None:
        """Load and validate heads.safetensors + heads.json (CheckpointError on any mismatch)."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / f'{HEADS_NAME}.json'
        manifest = load_manifest(path, HEADS_FORMAT)
        if manifest.get('hidden_size') != self.hidden_size:
            raise CheckpointError(f'{path}: heads were built for hidden size '
                                  f'{manifest.get("hidden_size")}, the backbone has '
                                  f'{self.hidden_size}')
        wrong = {k: (manifest.get(k), v) for k, v in self.heads_manifest().items()
                 if k in ('num_layers', 'codes_per_layer', 'levels') and manifest.get(k) != v}
        names = _proprio_names(manifest, path)
        if names != self.proprio_names:
            wrong['proprio_names'] = (list(names), list(self.proprio_names))
        if wrong:
            raise CheckpointError(f'{path}: ' + ', '.join(
                f'{k} {found}, the bundle manifest says {want}'
                for k, (found, want) in wrong.items()))
        tensors = load_tensors(bundle_dir / f'{HEADS_NAME}.safetensors')
        check_state_dict(tensors, self.heads_state_dict(), str(bundle_dir / HEADS_NAME))
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_dir(cls, bundle_dir: str | Path, device: str | torch.device = 'cpu',
                 dtype: str | torch.dtype = torch.float32) -> 'MainModel':
        """Load a bundle (see docs/ARCHITECTURE.md), validated, in eval mode with gradients off.

        Raises CheckpointError naming what is wrong: missing files, manifest/backbone/heads
        disagreeing on sizes, non-finite weights.
        """
        bundle_dir = Path(bundle_dir)
        dtype, device = resolve_dtype(dtype), torch.device(device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f'device {device} requested but CUDA is not available here')
        if emulated_bfloat16(device, dtype):
            logger.warning(EMULATED_BF16_WARNING)
        manifest = load_bundle_manifest(bundle_dir)
        backbone_dir = bundle_dir / 'backbone'
        _check_backbone_files(backbone_dir)
        try:
            config = LlavaConfig.from_pretrained(str(backbone_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f'{backbone_dir}: not a LLaVA config ({exc})') from exc
        _check_config(config, manifest, bundle_dir)
        with quiet_transformers():
            backbone = LlavaForConditionalGeneration.from_pretrained(
                str(backbone_dir), config=config, local_files_only=True, use_safetensors=True,
                dtype=dtype)
        bad = non_finite_keys(dict(backbone.named_parameters()))
        if bad:
            raise CheckpointError(f'{backbone_dir}: non-finite values in {bad[:5]}'
                                  + (f' and {len(bad) - 5} more' if len(bad) > 5 else ''))
        try:
            processor = PromptProcessor.from_backbone(backbone_dir, config,
                                                      manifest['prompt_template'])
        except (OSError, ValueError) as exc:
            raise CheckpointError(f'{backbone_dir}: text tokenizer unusable ({exc})') from exc
        model = cls(backbone, processor, manifest['num_layers'], manifest['codes_per_layer'],
                    manifest['levels'], manifest['weights_sha256'],
                    heads_proprio_names(bundle_dir))
        model.load_heads(bundle_dir)
        verify_file_hashes(bundle_dir, manifest)       # after the checks that say more
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        logger.info('main model %s: hidden %d, %s on %s, weights %s', bundle_dir,
                    model.hidden_size, str(dtype).removeprefix('torch.'), device,
                    model.weights_hash[:12])
        return model


def heads_proprio_names(bundle_dir: str | Path) -> tuple[str, ...]:
    """The proprioception input names a bundle's heads.json declares (empty: none)."""
    path = Path(bundle_dir) / f'{HEADS_NAME}.json'
    return _proprio_names(load_manifest(path, HEADS_FORMAT), path)


def _proprio_names(manifest: dict, path: Path) -> tuple[str, ...]:
    """Validated 'proprio_names' of a heads.json (absent: none)."""
    names = manifest.get('proprio_names', [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise CheckpointError(f'{path}: proprio_names must be a list of distinct names, got '
                              f'{names!r}')
    return tuple(names)


def _check_backbone_files(backbone_dir: Path) -> None:
    if not backbone_dir.is_dir():
        raise CheckpointError(f'{backbone_dir}: backbone directory not found')
    missing = [n for n in ('config.json', 'tokenizer.json', 'tokenizer_config.json')
               if not (backbone_dir / n).is_file()]
    if not any(backbone_dir.glob('*.safetensors')):
        missing.append('*.safetensors weights')
    if missing:
        raise CheckpointError(f'{backbone_dir}: missing {missing}')


def _check_config(config, manifest: dict, bundle_dir: Path) -> None:
    text_hidden = config.text_config.hidden_size
    if text_hidden != manifest['hidden_size']:
        raise CheckpointError(f'{bundle_dir}/manifest.json: hidden_size {manifest["hidden_size"]}'
                              f' but the backbone language model has {text_hidden}')
    if config.vision_config.image_size != manifest['image_size']:
        raise CheckpointError(f'{bundle_dir}/manifest.json: image_size {manifest["image_size"]}'
                              f' but the vision tower takes {config.vision_config.image_size}')
