"""Prompt processing of the main model: camera image + instruction -> LLaVA model inputs.

The prompt is OpenVLA's, lower-cased: 'In: What action should the robot take to {instruction}?
\\nOut:'. The text tokenizer is word-level (one id per word or punctuation mark, `<unk>` for
anything else), built with the `tokenizers` library and stored as a transformers fast tokenizer
inside the bundle's backbone directory. The sequence fed to the model is
`<s> <image> x N_image_tokens <prompt words>`; LLaVA replaces the `<image>` placeholders with the
projected vision features.
"""

from importlib import resources
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # transformers is imported lazily at run time
    from transformers import LlavaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = 'In: What action should the robot take to {instruction}?\nOut:'
SPECIAL_TOKENS = ('<pad>', '<s>', '</s>', '<unk>', '<image>')
PAD, BOS, EOS, UNK, IMAGE = SPECIAL_TOKENS
# CLIP's image normalisation (the vision tower of the built-in model is CLIP-shaped).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def instruction_vocabulary() -> list[str]:
    """The words of `rsd_core/data/instruction_vocab.txt` in file order (comments skipped)."""
    text = resources.files('rsd_core').joinpath('data/instruction_vocab.txt').read_text()
    words = [line.strip() for line in text.splitlines()]
    return [w for w in dict.fromkeys(words) if w and not w.startswith('#')]


def build_text_tokenizer(words: list[str] | None = None) -> 'PreTrainedTokenizerFast':
    """A word-level transformers fast tokenizer: special tokens first, then `words`.

    Text is NFKC-normalised and lower-cased, split on whitespace, then every punctuation mark
    becomes its own word. Save it with `save_pretrained(backbone_dir)`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = instruction_vocabulary() if words is None else words
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation('isolated')])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=PAD,
                                   extra_special_tokens={'image_token': IMAGE})


def load_text_tokenizer(backbone_dir: str | Path) -> 'PreTrainedTokenizerBase':
    """Load the tokenizer saved in a backbone directory (never from a hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(backbone_dir), local_files_only=True)


MAX_INSTRUCTION_BYTES = 2048   # UTF-8 bytes of one instruction, checked before tokenising
RESERVED_POSITIONS = 16        # after the prompt: the robot state, the L = 8 layers, a margin


class PromptProcessor:
    """Text tokenizer + image preprocessing of one backbone.

    Images are resized (antialiased bilinear, aspect ratio not kept) to `image_size` square and
    normalised with CLIP's mean/std. An instruction is bounded twice: at most
    `max_instruction_bytes` UTF-8 bytes before it is tokenised (so an oversized one costs
    nothing), and its prompt must fit the language model's positions (`max_positions`, minus
    the image tokens and RESERVED_POSITIONS) after.
    """

    def __init__(self, tokenizer: 'PreTrainedTokenizerBase', image_size: int,
                 num_image_tokens: int, prompt_template: str = PROMPT_TEMPLATE,
                 max_positions: int | None = None,
                 max_instruction_bytes: int = MAX_INSTRUCTION_BYTES) -> None:
        if '{instruction}' not in prompt_template:
            raise ValueError(f'prompt template {prompt_template!r} has no {{instruction}} field')
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.prompt_template = prompt_template
        self.bos_id = self._special_id(BOS)
        self.pad_id = self._special_id(PAD)
        self.image_id = self._special_id(IMAGE)
        self.unk_id = self._special_id(UNK)
        self._mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self._warned: set[str] = set()
        self.max_instruction_bytes = max_instruction_bytes
        self.max_prompt_tokens = None if max_positions is None else \
            max_positions - 1 - self.num_image_tokens - RESERVED_POSITIONS

    @classmethod
    def from_backbone(cls, backbone_dir: str | Path, config: 'LlavaConfig | None' = None,
                      prompt_template: str = PROMPT_TEMPLATE) -> 'PromptProcessor':
        """The processor of a LLaVA backbone directory: its tokenizer, image size and number
        of image tokens (config: its LlavaConfig, read from the directory when None)."""
        if config is None:
            from transformers import LlavaConfig

            config = LlavaConfig.from_pretrained(str(backbone_dir), local_files_only=True)
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        cls_token = 0 if config.vision_feature_select_strategy == 'default' else 1
        processor = cls(load_text_tokenizer(backbone_dir), vision.image_size, patches + cls_token,
                        prompt_template, config.text_config.max_position_embeddings)
        if processor.image_id != config.image_token_id:
            raise ValueError(f'{backbone_dir}: tokenizer <image> id {processor.image_id}, model '
                             f'image_token_id {config.image_token_id}')
        if processor.vocab_size > config.text_config.vocab_size:
            raise ValueError(f'{backbone_dir}: tokenizer has {processor.vocab_size} tokens, the '
                             f'language model embeds {config.text_config.vocab_size}')
        return processor

    def _special_id(self, token: str) -> int:
        vocab = self.tokenizer.get_vocab()
        if token not in vocab:
            raise ValueError(f'text tokenizer has no {token} token (expected {SPECIAL_TOKENS})')
        return int(vocab[token])

    @property
    def vocab_size(self) -> int:
        """Number of text tokens, special tokens included."""
        return len(self.tokenizer)

    def __call__(self, images: list[np.ndarray], instructions: list[str],
                 pad: bool = False) -> dict:
        """Images [H, W, 3] uint8 RGB (any size) + instructions -> model inputs.

        Returns {'input_ids': [B, S] long, 'pixel_values': [B, 3, image_size, image_size] float32}.
        Without `pad` all prompts of a batch must tokenize to the same length; with it, shorter
        prompts are left-padded with <pad> and 'attention_mask' [B, S] long (0 at padding)
        is added (the model masks the padding and numbers positions from each prompt's start).
        """
        if not isinstance(images, (list, tuple)) or not isinstance(instructions, (list, tuple)):
            raise ValueError('expected a list of images and a list of instructions, got '
                             f'{type(images).__name__} and {type(instructions).__name__}')
        if len(images) != len(instructions) or not images:
            raise ValueError(f'expected as many images as instructions (at least one), got '
                             f'{len(images)} images and {len(instructions)} instructions')
        pixels = torch.cat([self.preprocess_image(im) for im in images])
        rows = self.prompt_ids(instructions)
        if not pad:
            return {'input_ids': equal_length(rows), 'pixel_values': pixels}
        width = max(len(row) for row in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])  # [B, S]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # [B, S]
        return {'input_ids': ids, 'pixel_values': pixels, 'attention_mask': mask}

    def prompt(self, instruction: str) -> str:
        """The prompt text of one instruction (validated, stripped, lower-cased)."""
        if not isinstance(instruction, str):
            raise ValueError(f'instruction must be a str, got {type(instruction).__name__}')
        size = len(instruction.encode('utf-8', 'surrogatepass'))
        if size > self.max_instruction_bytes:
            raise ValueError(f'instruction of {size} bytes refused: at most '
                             f'{self.max_instruction_bytes} bytes')
        if not instruction.strip():
            raise ValueError('instruction is empty; expected a task description such as '
                             "'pick up the black bowl and place it on the plate'")
        return self.prompt_template.format(instruction=instruction.strip().lower())

    def encode_text(self, instructions: list[str]) -> torch.Tensor:
        """Instructions -> input_ids [B, S]: <s>, the image placeholders, the prompt words."""
        return equal_length(self.prompt_ids(instructions))

    def prompt_ids(self, instructions: list[str]) -> list[list[int]]:
        """Instructions -> one id list each: <s>, the image placeholders, the prompt words."""
        rows = []
        for instruction in instructions:
            text = self.tokenizer(self.prompt(instruction), add_special_tokens=False,
                                  split_special_tokens=True)['input_ids']
            if self.max_prompt_tokens is not None and len(text) > self.max_prompt_tokens:
                raise ValueError(f'instruction prompt of {len(text)} tokens refused: the '
                                 f"model's positions leave {self.max_prompt_tokens}")
            if self.unk_id in text:
                self._report_unknown(instruction)
            rows.append([self.bos_id] + [self.image_id] * self.num_image_tokens + list(text))
        return rows

    def unknown_words(self, instruction: str) -> list[str]:
        """Words of `instruction` that are not in the vocabulary (they map to <unk>)."""
        backend = self.tokenizer.backend_tokenizer
        text = backend.normalizer.normalize_str(instruction)
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [w for w in dict.fromkeys(words) if backend.token_to_id(w) is None]

    def _report_unknown(self, instruction: str) -> None:
        if instruction in self._warned:
            return
        self._warned.add(instruction)
        logger.warning('instruction %r: words outside the vocabulary, read as <unk>: %s',
                       instruction, ', '.join(self.unknown_words(instruction)))

    def preprocess_image(self, image: np.ndarray) -> torch.Tensor:
        """One [H, W, 3] uint8 RGB image -> [1, 3, image_size, image_size] float32, normalised."""
        check_image_array(image)
        # A C-ordered copy: camera arrays may be read-only or flipped views (negative strides).
        x = torch.from_numpy(np.array(image, order='C')).permute(2, 0, 1)[None]  # [1, 3, H, W]
        x = x.to(torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode='bilinear',
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - self._mean) / self._std


def equal_length(rows: list[list[int]]) -> torch.Tensor:
    """Id lists of one length -> [B, S] long; ValueError naming the lengths otherwise."""
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f'prompts of one batch tokenize to different lengths {lengths}; '
                         'pass pad=True, or run them one at a time')
    return torch.tensor(rows, dtype=torch.long)  # [B, S]


def check_image_array(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is a non-empty [H, W, 3] uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f'image must be a numpy array [H, W, 3] uint8, got '
                         f'{type(image).__name__}')
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image has shape {list(image.shape)}; expected [H, W, 3] RGB')
    if image.size == 0:
        raise ValueError(f'image has zero size (shape {list(image.shape)})')
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError('image contains NaN or Inf values; expected uint8 RGB in 0..255')
    if image.dtype != np.uint8:
        raise ValueError(f'image has dtype {image.dtype}; expected uint8 RGB in 0..255')
