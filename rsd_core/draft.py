"""Draft model v1 (the seed architecture): guesses RFSQ layers 1..K from the main model's
prompt hidden state h0.

h0 [B, H] -> input_proj (Linear H -> 512, trained, part of the checkpoint) -> K query positions
(projected h0 + learned positional encoding) -> one pre-norm transformer decoder layer that
cross-attends to the projected h0 -> final LayerNorm -> one classification head per position ->
logits [B, K, C, V] for layers 1..K.

Layout 'shared' holds the original system's checkpoints exactly (`rsd import-draft`): ONE
position, projected h0 plus its positional encoding, that the decoder layer attends to as both
target and memory (no mask), and every head reads that one vector. 'queries' (above) is what
this project trains. Draft v2 (reads the main's features, uses its head) is `draft_v2.py`.

A draft is only ever built from a validated checkpoint (`DraftModel.load`) or by training code;
nothing else creates an input projection.
"""

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
import logging
from pathlib import Path

import torch
from torch import nn

from rsd_core.checkpoint import (
    CheckpointError,
    file_sha256,
    key_problems,
    load_manifest,
    load_tensors,
    non_finite_keys,
    save_component,
)

logger = logging.getLogger(__name__)

FORMAT = 'rsd-draft'
VERSION = 1
NAME = 'draft'
MAX_PROPOSALS = 6  # L - 2: the verification pass itself yields the layer after the last proposal
PROJECTION_KEYS = ('input_proj.weight', 'input_proj.bias')
LAYOUTS = ('queries', 'shared')


@dataclass
class DraftConfig:
    """Sizes of a draft model. hidden_size is the main model's hidden size H."""

    hidden_size: int
    d_model: int = 512
    n_heads: int = 8
    ffn: int = 2048
    num_proposals: int = 3
    head_hidden: int = 256
    codes_per_layer: int = 128
    levels: int = 7
    dropout: float = 0.0
    layout: str = 'queries'     # LAYOUTS, see the module docstring

    def __post_init__(self) -> None:
        for name in ('hidden_size', 'd_model', 'n_heads', 'ffn', 'head_hidden',
                     'codes_per_layer', 'levels'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'DraftConfig.{name} must be a positive integer, got {value!r}')
        if not 1 <= self.num_proposals <= MAX_PROPOSALS:
            raise ValueError(f'DraftConfig.num_proposals (K) must be in 1..{MAX_PROPOSALS}, '
                             f'got {self.num_proposals!r}')
        if self.d_model % self.n_heads:
            raise ValueError(f'd_model {self.d_model} is not divisible by n_heads {self.n_heads}')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'DraftConfig.dropout must be in [0, 1), got {self.dropout!r}')
        if self.layout not in LAYOUTS:
            raise ValueError(f'DraftConfig.layout must be one of {LAYOUTS}, got {self.layout!r}')

    @classmethod
    def from_dict(cls, values: dict) -> 'DraftConfig':
        """Build from a manifest's `config`; unknown or missing fields raise CheckpointError."""
        if not isinstance(values, dict):
            raise CheckpointError(f'draft config must be a JSON object, found {values!r}')
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CheckpointError(f'draft config has unknown fields {unknown}')
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f'invalid draft config: {exc}') from exc


class ProposalHead(nn.Sequential):
    """One layer's classifier: [B, d_model] -> [B, C * V]."""

    def __init__(self, config: DraftConfig):
        super().__init__(
            nn.Linear(config.d_model, config.head_hidden),
            nn.GELU(),
            nn.LayerNorm(config.head_hidden),
            nn.Linear(config.head_hidden, config.codes_per_layer * config.levels),
        )


class DraftModel(nn.Module):
    """Proposes RFSQ layers 1..K from h0 in one forward pass."""

    rolls = False      # proposes from h0 only: one verification round per chunk

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.hidden_size, config.d_model)
        positions = 1 if config.layout == 'shared' else config.num_proposals
        self.pos_embedding = nn.Parameter(torch.randn(positions, config.d_model) * 0.02)
        self.decoder = nn.TransformerDecoderLayer(
            config.d_model, config.n_heads, dim_feedforward=config.ffn, dropout=config.dropout,
            activation='gelu', batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(config.d_model)
        self.heads = nn.ModuleList(ProposalHead(config) for _ in range(config.num_proposals))
        self.register_buffer('causal_mask', nn.Transformer.generate_square_subsequent_mask(
            config.num_proposals), persistent=False)

    @property
    def num_proposals(self) -> int:
        """K, the layers (1..K) the draft proposes."""
        return self.config.num_proposals

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """h0 [B, H] (main prompt hidden state) -> logits [B, K, C, V] for layers 1..K."""
        memory = self.input_proj(h0.to(self.input_proj.weight.dtype)).unsqueeze(1)  # [B, 1, d]
        if self.config.layout == 'shared':
            x = memory + self.pos_embedding  # [B, 1, d]
            x = self.norm(self.decoder(x, x))[:, 0]  # [B, d], read by every head
            logits = torch.stack([head(x) for head in self.heads], dim=1)  # [B, K, C * V]
            return logits.unflatten(-1, (self.config.codes_per_layer, self.config.levels))
        queries = memory + self.pos_embedding  # [B, K, d]
        mask = self.causal_mask.to(queries.dtype)
        x = self.norm(self.decoder(queries, memory, tgt_mask=mask))  # [B, K, d]
        logits = torch.stack([head(x[:, k]) for k, head in enumerate(self.heads)], dim=1)
        return logits.unflatten(-1, (self.config.codes_per_layer, self.config.levels))

    def proposal_logits(self, hidden: torch.Tensor, codes: torch.Tensor, layer: int,
                        k: int) -> torch.Tensor:
        """The engine's draft interface: logits [B, k, C, V] for layers 1..k. hidden is h0
        [B, H]; v1 proposes only from layer 0 (codes, layer 0's, are not read)."""
        if layer != 0:
            raise ValueError(f'a v1 draft proposes from layer 0 only, asked for layer {layer}')
        return self(hidden)[:, :k]

    @torch.no_grad()
    def propose(self, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h0 [B, H] -> (codes [B, K, C] long, greedy; logits [B, K, C, V])."""
        logits = self(h0)
        return logits.argmax(-1), logits

    def save(self, directory: str | Path, provenance: dict) -> Path:
        """Write draft.safetensors + draft.json; return the weights path.

        provenance: main_weights_sha256 (str | None), trained (bool), metrics (dict), plus any
        description of the training data; `created` (UTC ISO time) is added when absent.
        """
        if not isinstance(provenance.get('trained'), bool):
            raise ValueError("provenance['trained'] must be a bool: say whether the draft "
                             '(including its input projection) was trained')
        provenance = {'main_weights_sha256': None, 'metrics': {},
                      'created': datetime.now(UTC).isoformat(timespec='seconds'),
                      **provenance}
        manifest = {'format': FORMAT, 'version': VERSION, 'config': asdict(self.config),
                    'provenance': provenance}
        return save_component(directory, NAME, self.state_dict(), manifest)

    @classmethod
    def load(cls, directory: str | Path, main_hidden_size: int,
             main_weights_hash: str | None = None, strict_provenance: bool = False,
             device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32,
             ) -> 'DraftModel':
        """Validate a draft checkpoint against the main model, then build it (eval mode).

        directory: a draft directory (draft.safetensors + draft.json) or the .safetensors file.
        Raises CheckpointError naming the keys/shapes/sizes at fault; warns (or raises, with
        strict_provenance) when the draft was distilled from different main weights.
        """
        weights, manifest_path = checkpoint_paths(directory)
        tensors = read_weights(weights)
        manifest = load_manifest(manifest_path, FORMAT)
        if manifest.get('kind', 'v1') != 'v1':
            raise CheckpointError(f'{manifest_path}: a {draft_kind(manifest)} draft, not v1; '
                                  'load it with rsd_core.draft_v2.load_draft')
        config = manifest_config(manifest, manifest_path)
        problems = draft_problems(tensors, config, main_hidden_size)
        if problems:
            raise CheckpointError(f'{weights}: ' + '; '.join(problems))
        check_provenance(manifest, weights, main_weights_hash, strict_provenance)
        model = cls(config)
        model.load_state_dict(tensors, strict=True)
        return model.to(device=device, dtype=dtype).eval()


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights file, manifest file) of a draft given as a directory or a weights file."""
    path = Path(path)
    if path.is_dir():
        weights = path / f'{NAME}.safetensors'
        if not weights.exists():
            others = sorted(p.name for p in path.iterdir()
                            if p.suffix in ('.pt', '.pth', '.bin', '.ckpt', '.pkl'))
            hint = f' (found {others}: pickled checkpoints are never loaded)' if others else ''
            raise CheckpointError(f'{path}: no {NAME}.safetensors in the draft directory{hint}')
        return weights, path / f'{NAME}.json'
    if not path.exists():
        raise CheckpointError(f'{path}: draft checkpoint not found')
    return path, path.with_suffix('.json')


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, telling a pickle or zip archive apart from corrupt bytes."""
    kind = sniff_pickle(path)
    if kind:
        raise CheckpointError(f'{path}: not a safetensors file, it is a {kind}; pickled '
                              'checkpoints are never loaded (convert it to safetensors)')
    if path.suffix != '.safetensors':
        raise CheckpointError(f'{path}: not a .safetensors file')
    return load_tensors(path)


def sniff_pickle(path: Path) -> str | None:
    """Name the format when the file starts like a torch.save zip archive or a raw pickle."""
    try:
        with open(path, 'rb') as stream:
            head = stream.read(4)
    except OSError as exc:
        raise CheckpointError(f'{path}: cannot read ({exc})') from exc
    if head.startswith(b'PK\x03\x04'):
        return 'zip archive (torch.save format)'
    if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
        return 'Python pickle'
    return None


def manifest_config(manifest: dict, where: Path) -> DraftConfig:
    """The DraftConfig recorded in a draft manifest (CheckpointError naming `where`)."""
    if 'config' not in manifest:
        raise CheckpointError(f'{where}: manifest has no "config"')
    try:
        return DraftConfig.from_dict(manifest['config'])
    except CheckpointError as exc:
        raise CheckpointError(f'{where}: {exc}') from exc


def expected_shapes(config: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a draft with this config (built on the meta device)."""
    with torch.device('meta'):
        model = DraftModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def draft_problems(tensors: dict[str, torch.Tensor], config: DraftConfig,
                   main_hidden_size: int | None) -> list[str]:
    """Every reason these tensors are not a usable draft for a main of this hidden size."""
    problems = []
    missing_proj = [k for k in PROJECTION_KEYS if k not in tensors]
    if missing_proj:
        problems.append('input projection weights missing: ' + ', '.join(missing_proj)
                        + ' (a draft without its trained projection only produces noise)')
    proj = tensors.get('input_proj.weight')
    if main_hidden_size is not None and proj is not None and proj.dim() == 2 \
            and proj.shape[1] != main_hidden_size:
        problems.append(f'input projection takes hidden size {proj.shape[1]}, but the main '
                        f'model has hidden size {main_hidden_size}')
    if main_hidden_size is not None and config.hidden_size != main_hidden_size \
            and (proj is None or proj.dim() != 2 or proj.shape[1] == main_hidden_size):
        problems.append(f'manifest config hidden_size {config.hidden_size} does not match '
                        f'the main model hidden size {main_hidden_size}')
    expected = expected_shapes(config)
    problems += key_problems(  # missing projection keys are reported above
        tensors, {k: v for k, v in expected.items() if k not in missing_proj},
        note=f' for config {config_summary(config)}')
    not_float = sorted(k for k in set(expected) & set(tensors)
                       if not tensors[k].is_floating_point())
    if not_float:
        problems.append(f'non-floating-point tensors {not_float}')
    bad = non_finite_keys(tensors)
    if bad:
        problems.append(f'non-finite values (NaN/Inf) in {bad}')
    return problems


def config_summary(config: DraftConfig) -> str:
    """The sizes that decide a draft's tensor shapes, as one line."""
    return (f'(hidden_size={config.hidden_size}, d_model={config.d_model}, '
            f'K={config.num_proposals}, C={config.codes_per_layer}, V={config.levels})')


def draft_kind(manifest: dict) -> str:
    """Which kind of draft a manifest describes: 'v1 seed', 'v1 seed, imported' or 'v2'."""
    if manifest.get('kind', 'v1') == 'v2':
        return 'v2'
    provenance = manifest.get('provenance')
    imported = isinstance(provenance, dict) and isinstance(provenance.get('imported'), dict)
    return 'v1 seed, imported' if imported else 'v1 seed'


def check_provenance(manifest: dict, weights: Path, main_weights_hash: str | None,
                     strict: bool) -> None:
    """Warn (or raise when strict) about a draft made for other main weights or never trained."""
    provenance = manifest.get('provenance')
    provenance = provenance if isinstance(provenance, dict) else {}
    recorded = provenance.get('main_weights_sha256')
    if main_weights_hash is not None and recorded != main_weights_hash:
        message = (f'{weights}: draft was distilled from main weights sha256 {recorded}, but '
                   f'the main model loaded has sha256 {main_weights_hash}; acceptance may '
                   'be poor')
        if recorded is None and isinstance(provenance.get('imported'), dict):
            message = (f'{weights}: draft was imported from {provenance["imported"].get("source")}'
                       ' and records no main weights sha256 (the original format has none), so '
                       'nothing shows it was trained on the outputs of this main model '
                       f'(sha256 {main_weights_hash}); strict provenance needs a draft '
                       'distilled from it (rsd train-draft)')
        if strict:
            raise CheckpointError(message)
        logger.warning(message)
    if provenance.get('trained') is not True:
        logger.warning('%s: manifest says the draft is not trained (trained=%r); its proposals '
                       'will rarely be accepted', weights, provenance.get('trained'))
    stored = manifest.get('weights_sha256')
    if stored is not None and stored != file_sha256(weights):
        logger.warning('%s: weights file sha256 differs from the one recorded in its manifest '
                       '(file modified after saving)', weights)
