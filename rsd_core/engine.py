"""Residual speculative decoding of one action chunk.

Main-only greedy decoding: `prefill` gives layer 0, then L-1 single-position steps
(`decode_layers`) give layers 1..L-1: L main passes. Speculative step (`speculative_decode`):
the draft proposes layers 1..K from h0 (`propose`), ONE main pass over [layer 0, proposals]
returns the main's logits for layers 1..K+1 (`verify`), the acceptance rule keeps the longest
passing prefix, the main's own layer after it comes free, and the cache is cropped to what was
kept. Ordinary steps finish the chunk: 1 + 1 + (L-2-accepted) main passes. K is chosen per
chunk by a `SpeculationPlanner` from measured acceptance and costs (K = 0: no draft pass).
A draft that rolls (v2, `rsd_core.draft_v2`) proposes from any layer, so steps repeat from the
main's hidden state and codes of the last decided layer (`speculative_rounds`).

Certified depth (`certified_decode`, acceptance 'bounded'): layers are decided in order and
decoding stops at the shallowest depth m whose certificate (`ActionTokenizer.truncation_bound`,
over every code of layers m..L-1) is within the tolerance, so the chunk differs from main-only
decoding by at most the tolerance in every action value. The decoder runs in float64.

Batches (`predict_batch`): B inputs share every main pass; a draft layer is kept only where it
passes for every row, and bounded decoding stops where every row is certified.

Shapes: B batch (1 in `predict`), L layers, C codes per layer, V levels, H hidden size,
T chunk steps, A action dims, k proposals.
"""

from collections.abc import Callable
from dataclasses import replace
import functools
import logging
from pathlib import Path
import threading
from typing import Any

import numpy as np
import torch

from rsd_core.acceptance import Verdict, accept_exact, accept_tolerance, near_ties
from rsd_core.bundle import default_bundle_dir
from rsd_core.certified_depth import Certifier, depth_certifier
from rsd_core.draft import DraftModel
from rsd_core.draft_v2 import FeatureDraft, load_draft
from rsd_core.engine_config import EngineConfig
from rsd_core.main_model import MainModel, resolve_dtype
from rsd_core.speculation import SpeculationPlanner
from rsd_core.stats import PHASES, ChunkStats
from rsd_core.timing import PhaseTimer
from rsd_core.tokenizer import ActionTokenizer, codes_to_tokens

logger = logging.getLogger(__name__)

Cache = Any     # transformers DynamicCache, owned and cropped by MainModel
Draft = DraftModel | FeatureDraft
# rule(prefix [B, 1, C], proposals [B, k, C], main_codes [B, k, C]) -> Verdict
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Verdict]


class NonFiniteLogitsError(RuntimeError):
    """A model produced NaN/Inf logits; decoding them would give garbage actions."""


def check_finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    """`logits` unchanged (any shape); NonFiniteLogitsError naming `where` if any is NaN/Inf."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError(
            f'{where} produced non-finite logits (NaN/Inf) in {logits.dtype}; refusing to '
            'decode them (overflow in a low-precision dtype, or corrupt weights?)')
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Most likely level of every code: logits [..., C, V] -> codes [..., C] (long)."""
    return logits.argmax(dim=-1)                                  # [..., C, V] -> [..., C]


def prefill(main: MainModel, inputs: dict) -> tuple[Cache, torch.Tensor, torch.Tensor]:
    """Prompt forward: (cache, h0 [B, H], logits of layer 0 [B, C, V])."""
    cache, h0, logits = main.prefill(inputs)
    return cache, h0, check_finite(logits, 'main prefill (layer 0)')


def decode_one_layer(main: MainModel, cache: Cache, codes: torch.Tensor,
                     layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed layer `layer` (codes [B, C]); return the main's logits for layer+1 [B, C, V] and
    the hidden state that chose them [B, H]."""
    logits, hidden = main.forward_layers(cache, codes[:, None], first_layer=layer)  # [B, 1, ..]
    return check_finite(logits[:, 0], f'main step (layer {layer + 1})'), hidden[:, 0]


def decode_layers(main: MainModel, cache: Cache, codes: torch.Tensor, num_layers: int,
                  timer: PhaseTimer) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """Greedy main steps from codes [B, l, C] (cache holds layers 0..l-2) up to num_layers.

    Returns (codes [B, num_layers, C], logits of the new layers, each [B, C, V], the hidden
    states that chose them, each [B, H]).
    """
    new_logits, new_hidden = [], []
    while codes.shape[1] < num_layers:
        with timer.phase('step'):
            logits, hidden = decode_one_layer(main, cache, codes[:, -1], codes.shape[1] - 1)
            codes = torch.cat([codes, greedy(logits)[:, None]], dim=1)     # [B, l+1, C]
        new_logits.append(logits)
        new_hidden.append(hidden)
    return codes, new_logits, new_hidden


def greedy_features(main: MainModel, inputs: dict, num_layers: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Main-only greedy decoding of layers 0..l-1 (l = num_layers, default every layer L),
    keeping what it saw: (features [B, l, H], the hidden states that chose each layer
    (features[:, 0] = h0); codes [B, l, C]; logits [B, l, C, V], that chose each layer)."""
    cache, h0, logits0 = prefill(main, inputs)
    depth = main.num_layers if num_layers is None else num_layers
    codes, logits, hidden = decode_layers(main, cache, greedy(logits0)[:, None], depth,
                                          PhaseTimer(main.device))
    return torch.stack([h0] + hidden, dim=1), codes, torch.stack([logits0] + logits, dim=1)


def greedy_trace(main: MainModel, inputs: dict, num_layers: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`greedy_features` with only h0: (h0 [B, H], codes [B, l, C], logits [B, l, C, V])."""
    features, codes, logits = greedy_features(main, inputs, num_layers)
    return features[:, 0], codes, logits


def propose(draft: Draft, hidden: torch.Tensor, codes: torch.Tensor, layer: int,
            k: int) -> torch.Tensor:
    """Draft codes [B, k, C] for layers layer+1..layer+k, from the main's hidden state [B, H]
    that chose layer `layer` (h0 for layer 0) and that layer's codes [B, C]."""
    logits = draft.proposal_logits(hidden, codes, layer, k)       # [B, k, C, V]
    return greedy(check_finite(logits, 'draft'))


def verify(main: MainModel, cache: Cache, last: torch.Tensor, proposals: torch.Tensor,
           layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE main pass over [layer `layer` (codes last [B, C]), proposals [B, k, C]]: logits for
    layers layer+1..layer+k+1 [B, k+1, C, V] and the hidden states that chose them [B, k+1, H]."""
    codes = torch.cat([last[:, None], proposals], dim=1)         # [B, k+1, C]
    logits, hidden = main.forward_layers(cache, codes, first_layer=layer)
    return check_finite(logits, f'main verification of {proposals.shape[1]} proposals'), hidden


def speculative_decode(main: MainModel, draft: Draft, cache: Cache, hidden: torch.Tensor,
                       codes: torch.Tensor, k: int, rule: Rule, timer: PhaseTimer,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Verdict]:
    """Propose k layers after the decided ones, verify them in one pass, keep the accepted
    prefix + one free layer.

    codes [B, l+1, C]: layers 0..l (the cache holds the prompt + layers 0..l-1); hidden [B, H]:
    the main's hidden state that chose layer l. Returns (codes [B, l+a+2, C], the main logits
    that chose layers l+1..l+a+1 [B, a+1, C, V], the main's hidden state that chose layer
    l+a+1 [B, H], verdict) with the cache cropped to the prompt + layers 0..l+a.
    """
    layer = codes.shape[1] - 1
    with timer.phase('draft'):
        proposals = propose(draft, hidden, codes[:, -1], layer, k)        # [B, k, C]
    kept = main.cache_length(cache)
    with timer.phase('verify'):
        logits, states = verify(main, cache, codes[:, -1], proposals, layer)  # [B, k+1, ...]
        main_codes = greedy(logits)                                       # [B, k+1, C]
    with timer.phase('accept'):
        verdict = rule(codes, proposals, main_codes[:, :k])
    a = verdict.accepted
    main.crop(cache, kept + 1 + a)                                # drop rejected positions
    codes = torch.cat([codes, proposals[:, :a], main_codes[:, a:a + 1]], dim=1)
    return codes, logits[:, :a + 1], states[:, a], verdict        # codes: [B, l+a+2, C]


def speculative_rounds(main: MainModel, draft: Draft, cache: Cache, h0: torch.Tensor,
                       codes: torch.Tensor, k: int, rule: Rule, timer: PhaseTimer,
                       depth: int) -> tuple[torch.Tensor, torch.Tensor, list[Verdict]]:
    """Speculative steps from layer 0 (codes [B, 1, C]) while a proposal fits below `depth`
    layers (one for a v1 draft), each from the main's hidden state and codes of the last
    decided layer: its truth, also after a rejection. Returns (codes [B, m, C], the main
    logits that chose layers 1..m-1 [B, m-1, C, V], one verdict per step)."""
    hidden, logits, verdicts = h0, [], []
    while not verdicts or draft.rolls:
        k_step = min(k, depth - 1 - codes.shape[1])               # the free layer < depth
        if k_step < 1:
            break
        codes, step_logits, hidden, verdict = speculative_decode(
            main, draft, cache, hidden, codes, k_step, rule, timer)
        logits.append(step_logits)
        verdicts.append(verdict)
    return codes, torch.cat(logits, dim=1), verdicts


def certified_decode(main: MainModel, cache: Cache, codes: torch.Tensor, certify: Certifier,
                     timer: PhaseTimer,
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                list[torch.Tensor]]:
    """Decide layers in order from codes [B, l, C] (cache holds layers 0..l-2) and stop at the
    shallowest depth m whose certificate passes (depth L always does).

    Returns (codes [B, m, C], (certified bound, actions) [B, T, A] each, logits of the new
    layers).
    """
    depth, new_logits = 1, []
    while True:
        if depth > codes.shape[1]:
            with timer.phase('step'):
                logits, _ = decode_one_layer(main, cache, codes[:, -1], codes.shape[1] - 1)
                codes = torch.cat([codes, greedy(logits)[:, None]], dim=1)     # [B, l+1, C]
            new_logits.append(logits)
        with timer.phase('certify'):
            certified = certify(codes[:, :depth])
        if certified is not None:
            return codes[:, :depth], certified, new_logits
        depth += 1


def check_instruction(instruction: Any) -> None:
    """ValueError unless `instruction` is a string with some non-whitespace text."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f'instruction must be a non-empty string, got {instruction!r}')


class RSDEngine:
    """Main model + action tokenizer + optional draft: image and instruction -> action chunk.

    `predict` may run in one thread while `update_config` is called from another: each call
    reads the (immutable) config once at its start.
    """

    def __init__(self, main: MainModel, tokenizer: ActionTokenizer,
                 draft: Draft | None = None, config: EngineConfig | None = None) -> None:
        self.main, self.tokenizer, self.draft = main, tokenizer, draft
        tok = tokenizer.config
        if (main.num_layers, main.codes_per_layer, main.levels) != \
                (tok.num_layers, tok.chunk_len * tok.latent_dim, tok.levels):
            raise ValueError(
                f'main model (L={main.num_layers}, C={main.codes_per_layer}, V={main.levels}) '
                f'does not match the action tokenizer (L={tok.num_layers}, '
                f'C={tok.chunk_len * tok.latent_dim}, V={tok.levels})')
        if draft is not None:
            found = (draft.config.hidden_size, draft.config.codes_per_layer, draft.config.levels)
            wanted = (main.hidden_size, main.codes_per_layer, main.levels)
            if found != wanted:
                raise ValueError(f'draft (H, C, V) = {found} does not match the main model '
                                 f'{wanted}')
            if draft.num_proposals > main.num_layers - 2:
                raise ValueError(f'draft proposes {draft.num_proposals} layers; at most '
                                 f'L-2 = {main.num_layers - 2} can be verified')
            if isinstance(draft, FeatureDraft):
                draft.bind(main)                  # v2 reads the main's embedding and head
        config = config or EngineConfig()
        if draft is None and config.use_draft:
            logger.info('no draft model: use_draft=True ignored, decoding without a draft')
            config = replace(config, use_draft=False)
        self.tokenizer = tokenizer.to(torch.float64)   # decode and certify in float64
        self.certificates = self.tokenizer.depth_certifier()
        self.planner = SpeculationPlanner()
        self._expected_depth = main.num_layers         # depth of the last bounded chunk
        self._lock = threading.Lock()
        self._config = self._checked(config)

    @classmethod
    def from_dirs(cls, model_dir: str | Path | None = None, draft_dir: str | Path | None = None,
                  device: str = 'cpu', dtype: str | torch.dtype = 'float32',
                  **config: Any) -> 'RSDEngine':
        """Load a bundle (default bundle when model_dir is None) and a draft.

        draft_dir: None or 'default' = the bundle's draft/ if present, '' = no draft.
        config: EngineConfig fields.
        """
        model_dir = Path(model_dir) if model_dir else Path(default_bundle_dir())
        torch_dtype = resolve_dtype(dtype)
        main = MainModel.from_dir(model_dir, device=device, dtype=torch_dtype)
        tokenizer = ActionTokenizer.load(model_dir / 'action_tokenizer', device=device)
        if draft_dir is None or str(draft_dir) == 'default':
            draft_dir = model_dir / 'draft'
            if not (draft_dir / 'draft.json').is_file():
                logger.info('%s has no draft; running main-only', model_dir)
                draft_dir = ''
        draft = None
        if str(draft_dir):
            draft = load_draft(draft_dir, main, device=device, dtype=torch_dtype)
        return cls(main, tokenizer, draft, EngineConfig(**config))

    @property
    def config(self) -> EngineConfig:
        """The current (immutable) configuration."""
        return self._config

    def update_config(self, **changes: Any) -> EngineConfig:
        """Validate and apply EngineConfig field changes; takes effect at the next call."""
        with self._lock:
            self._config = self._checked(replace(self._config, **changes))
            return self._config

    def _checked(self, config: EngineConfig) -> EngineConfig:
        if config.use_draft and self.draft is None:
            raise ValueError('use_draft=True but the engine has no draft model')
        k = config.num_proposals
        if k is not None and self.draft is not None and k > self.draft.num_proposals:
            raise ValueError(f'num_proposals {k} exceeds the draft K = '
                             f'{self.draft.num_proposals}')
        dims = self.tokenizer.config.action_dim
        if isinstance(config.tolerance, tuple) and len(config.tolerance) != dims:
            raise ValueError(f'tolerance needs one value or {dims} (one per action dim), got '
                             f'{len(config.tolerance)}')
        return config

    @property
    def proprio_names(self) -> tuple[str, ...]:
        """Names of the robot-state values the main model takes (empty: it takes none)."""
        return self.main.proprio_names

    def predict(self, image: np.ndarray, instruction: str, use_draft: bool | None = None,
                proprio: np.ndarray | None = None) -> tuple[np.ndarray, ChunkStats]:
        """One chunk: image [H, W, 3] uint8 RGB + instruction (+ proprio [P], the values named
        in `proprio_names`, when the model takes them) -> (actions [T, A] float32 in action
        units, stats). use_draft overrides the config for this call."""
        _, actions, stats = self.decode_tokens(image, instruction, use_draft, proprio)
        return actions, stats

    def decode_tokens(self, image: np.ndarray, instruction: str, use_draft: bool | None = None,
                      proprio: np.ndarray | None = None,
                      ) -> tuple[torch.Tensor, np.ndarray, ChunkStats]:
        """Like `predict`, also returning the chosen codes [L, C] long."""
        config = self._config
        if use_draft is not None:
            config = self._checked(replace(config, use_draft=use_draft))
        check_instruction(instruction)            # the image: by the processor, once
        state = self._check_proprio(proprio)
        codes, actions, stats = self._run([image], [instruction], state, config)
        return codes[0].cpu(), actions[0].float().cpu().numpy(), stats

    def predict_batch(self, images: list[np.ndarray], instructions: list[str],
                      proprios: list[np.ndarray] | None = None, use_draft: bool | None = None,
                      ) -> tuple[np.ndarray, ChunkStats]:
        """B chunks decoded as one batch: the prefill and every layer step run over all B
        inputs; prompts of different lengths are left-padded and masked. Returns (actions
        [B, T, A] float32 in action units, the batch's stats). Per row, the mode's guarantee
        holds: main-only and exact give each row's greedy codes (a draft layer is kept only
        where it passes for every row), bounded stops at the shallowest depth certified for
        every row. Each row's result equals its `predict` up to float rounding."""
        if not isinstance(images, (list, tuple)) or not images or \
                len(images) != len(instructions):
            raise ValueError('expected equal, non-empty lists of images and instructions')
        config = self._config
        if use_draft is not None:
            config = self._checked(replace(config, use_draft=use_draft))
        for instruction in instructions:
            check_instruction(instruction)
        state = None
        if self.proprio_names:
            if proprios is None or len(proprios) != len(images):
                raise ValueError(f'the main model takes proprioception: pass one proprio '
                                 f'[{len(self.proprio_names)}] per image')
            state = torch.cat([self._check_proprio(p) for p in proprios])     # [B, P]
        _, actions, stats = self._run(list(images), list(instructions), state, config)
        return actions.float().cpu().numpy(), stats

    @torch.inference_mode()
    def trace(self, image: np.ndarray, instruction: str, proprio: np.ndarray | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Main-only greedy decoding of one input with what it saw (`greedy_trace`): (h0 [H],
        codes [L, C], logits [L, C, V]), on the engine's device."""
        check_instruction(instruction)
        inputs = self._inputs([image], [instruction], self._check_proprio(proprio))
        h0, codes, logits = greedy_trace(self.main, inputs)
        return h0[0], codes[0], logits[0]

    def _check_proprio(self, proprio: np.ndarray | None) -> torch.Tensor | None:
        """proprio [P] -> [1, P] float32 tensor (None when the model takes no state)."""
        names = self.proprio_names
        if not names:
            return None
        if proprio is None:
            raise ValueError(f'the main model takes proprioception: pass proprio '
                             f'[{len(names)}] ({", ".join(names)})')
        state = np.asarray(proprio, dtype=np.float32)
        if state.shape != (len(names),):
            raise ValueError(f'proprio has shape {list(state.shape)}; expected [{len(names)}] '
                             f'({", ".join(names)})')
        if not np.isfinite(state).all():
            raise ValueError('proprio contains NaN or Inf values')
        return torch.from_numpy(state)[None]  # [1, P]

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray], instructions: list[str],
             proprio: torch.Tensor | None, config: EngineConfig,
             ) -> tuple[torch.Tensor, torch.Tensor, ChunkStats]:
        timer = PhaseTimer(self.device)
        bounded = config.acceptance == 'bounded'
        rule = 'exact' if bounded else config.acceptance      # how draft layers are verified
        num_layers = self.main.num_layers
        verdicts, k, bound, decided = [], 0, None, []
        with timer.phase('total'):
            with timer.phase('preprocess'):
                inputs = self._inputs(images, instructions, proprio)
            with timer.phase('prefill'):
                cache, h0, logits0 = prefill(self.main, inputs)
                codes = greedy(logits0)[:, None]                  # [B, 1, C]
            if config.use_draft:
                k = self._num_proposals(config, rule, bounded)
            if k:
                codes, logits, verdicts = speculative_rounds(
                    self.main, self.draft, cache, h0, codes, k, self._rule(config), timer,
                    self._expected_depth if bounded else num_layers)
                decided = list(logits.unbind(1))                  # main logits of layers 1..
            if bounded:
                codes, (bound, actions), step_logits = certified_decode(
                    self.main, cache, codes, self._certifier(config), timer)
                actions = actions.float()                         # [B, T, A]
                self._expected_depth = codes.shape[1]
            else:
                codes, step_logits, _ = decode_layers(self.main, cache, codes, num_layers, timer)
                with timer.phase('decode'):
                    actions = self._decode(codes)                 # [B, T, A]
        elapsed = timer.elapsed_ms()
        stats = ChunkStats(
            **{f'{p}_ms': elapsed.get(p, 0.0) for p in ('total',) + PHASES},
            main_passes=1 + timer.count('verify') + timer.count('step'),
            near_ties=sum(near_ties(logits) for logits in decided + step_logits),
            used_draft=bool(k), layers_decoded=codes.shape[1], rounds=len(verdicts),
            certified_bound=None if bound is None else float(bound.max()),
            acceptance=config.acceptance if bounded or k else 'none')
        if verdicts:        # proposed / accepted over every step, depths of the first
            stats.layers_proposed = sum(len(v.passed) for v in verdicts)
            stats.layers_accepted = sum(v.accepted for v in verdicts)
            stats.accepted_by_depth = verdicts[0].passed
            stats.max_deviation = max(v.max_deviation for v in verdicts)
        self.planner.record(rule, [(len(v.passed), v.accepted) for v in verdicts],
                            stats.draft_ms, stats.verify_ms, timer.count('step'), stats.step_ms)
        return codes, actions, stats

    def _num_proposals(self, config: EngineConfig, rule: str, bounded: bool) -> int:
        """K for this chunk: at most num_proposals, and (bounded mode) no proposal past the
        layers the last chunk needed; chosen by the planner when adaptive."""
        k_max = config.num_proposals or self.draft.num_proposals
        needed = (self._expected_depth if bounded else self.main.num_layers) - 1
        if not config.adaptive:
            return min(k_max, needed - 1) if bounded else k_max
        return self.planner.choose(rule, k_max, needed, rolls=self.draft.rolls)

    def _certifier(self, config: EngineConfig) -> Certifier:
        return depth_certifier(self.tokenizer, self.certificates, config.tolerance, self.device)

    @property
    def device(self) -> torch.device:
        """The device the main model (and so every input) is on."""
        return self.main.device

    def _inputs(self, images: list[np.ndarray], instructions: list[str],
                proprio: torch.Tensor | None) -> dict:
        inputs = self.main.processor(images, instructions, pad=len(images) > 1)
        if proprio is not None:
            inputs['proprio'] = proprio                           # [B, P]
        return {key: value.to(self.device) for key, value in inputs.items()}

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, l, C] -> actions [B, T, A] float32 in action units, from the first l
        layers (decoded in float64, then cast)."""
        tokens = codes_to_tokens(codes, self.tokenizer.config.latent_dim)
        return self.tokenizer.decode(tokens).float()

    def _rule(self, config: EngineConfig) -> Rule:
        if config.acceptance == 'exact':
            return lambda prefix, proposals, main_codes: accept_exact(proposals, main_codes)
        tolerance = torch.as_tensor(config.tolerance, dtype=torch.float32, device=self.device)
        tolerance = tolerance.expand(self.tokenizer.config.action_dim)       # [A]
        return functools.partial(accept_tolerance, self._decode, tolerance=tolerance)
