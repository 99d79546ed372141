"""Draft v2 (EAGLE-style): reads the main's own features and proposes with the main's own head.

The main feeds layer l's embedding e_l = main.layer_embedding(codes_l, l) at one position and its
hidden state there, f_{l+1}, gives layer l+1 through main.rfsq_head (f_0 = h0, the prompt's
last hidden state, gives layer 0). The draft imitates that one step of the language model:

    x_l    = fuse([z_l(f_l), z_l(e_l)]) + position(l)             [B, d]
    y      = one causal pre-norm transformer layer over x_l.. of this roll
    f'_l+1 = z_l+1^-1(out(norm(y_l)))                              [B, H]  the main's next hidden
    logits of layer l+1 = main.rfsq_head(f'_l+1)                   [B, C, V]  (frozen, the main's)

and rolls forward: layer l+1's greedy codes and its own f'_l+1 feed the next step. A roll
starts from the main's truth (the hidden state that chose the last decided layer, and that
layer's codes), which is what the engine hands it after every verification, accepted or not.
Trained on the main's greedy trajectories with its own predicted features fed back
(`rsd_core.training.draft_v2_training`).

z_l standardises per layer and per dimension with the mean and std of the training
trajectories' f_l (and, separately, e_l): buffers, saved in the file. Chosen over a LayerNorm
per vector: a main's hidden states at one layer share a large common part (on the tiny test
main norm 8 against a spread of 0.5 across inputs) and what decides the next codes is the small
rest. Standardised, that rest is unit-sized in the input and in the regression target; on the
tiny main held-out next-layer code agreement rose from 0.92-0.96 (the constant guess's level)
to 0.98-0.99 (a least-squares fit of f_l+1 on (f_l, e_l): 0.995).

The file holds only what the draft adds (no copy of the main's head or embedding): it is
meaningless without the main it was distilled from, whose weights hash the manifest records.
`bind(main)` attaches the main's modules (not registered: never saved, never trained here).
`load_draft` reads either kind of draft directory (v1 `draft.DraftModel`, v2 `FeatureDraft`).
"""

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from rsd_core.checkpoint import (
    CheckpointError,
    key_problems,
    load_manifest,
    non_finite_keys,
    save_component,
)
from rsd_core.draft import (
    FORMAT,
    MAX_PROPOSALS,
    NAME,
    DraftModel,
    check_provenance,
    checkpoint_paths,
    draft_kind,
    read_weights,
)

VERSION = 2
KIND = 'v2'


@dataclass
class FeatureDraftConfig:
    """Sizes of a v2 draft; hidden_size, num_layers, codes_per_layer and levels are the
    main's (H, L, C, V)."""

    hidden_size: int
    num_layers: int = 8
    codes_per_layer: int = 128
    levels: int = 7
    d_model: int = 256
    n_heads: int = 4
    ffn: int = 1024
    num_proposals: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != 'dropout' and (not isinstance(value, int) or isinstance(value, bool)
                                        or value < 1):
                raise ValueError(f'FeatureDraftConfig.{f.name} must be a positive integer, '
                                 f'got {value!r}')
        if not 1 <= self.num_proposals <= min(MAX_PROPOSALS, self.num_layers - 2):
            raise ValueError(f'FeatureDraftConfig.num_proposals (K) must be in 1..'
                             f'{min(MAX_PROPOSALS, self.num_layers - 2)}, got '
                             f'{self.num_proposals!r}')
        if self.d_model % self.n_heads:
            raise ValueError(f'd_model {self.d_model} is not divisible by n_heads {self.n_heads}')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'dropout must be in [0, 1), got {self.dropout!r}')

    @classmethod
    def from_dict(cls, values: dict, where: Path) -> 'FeatureDraftConfig':
        """Build from a manifest's `config` (CheckpointError naming `where`)."""
        if not isinstance(values, dict) or set(values) - {f.name for f in fields(cls)}:
            raise CheckpointError(f'{where}: v2 draft config must be an object with fields '
                                  f'{[f.name for f in fields(cls)]}, found {values!r}')
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f'{where}: invalid v2 draft config: {exc}') from exc


class FeatureDraft(nn.Module):
    """Predicts the main's next hidden states; the main's head turns them into layers."""

    rolls = True       # can propose from any decided layer (the engine verifies in rounds)

    def __init__(self, config: FeatureDraftConfig):
        super().__init__()
        self.config = config
        hidden, d = config.hidden_size, config.d_model
        layers = config.num_layers
        self.register_buffer('feature_mean', torch.zeros(layers, hidden))    # [L, H]
        self.register_buffer('feature_std', torch.ones(layers, hidden))      # [L, H]
        self.register_buffer('embed_mean', torch.zeros(layers, hidden))      # [L, H]
        self.register_buffer('embed_std', torch.ones(layers, hidden))        # [L, H]
        self.fuse = nn.Linear(2 * hidden, d)
        self.position = nn.Embedding(config.num_layers, d)
        self.trunk = nn.TransformerEncoderLayer(
            d, config.n_heads, dim_feedforward=config.ffn, dropout=config.dropout,
            activation='gelu', batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, hidden)
        self._main: list[nn.Module] = []       # [layer_embedding, rfsq_head] of the main

    @property
    def num_proposals(self) -> int:
        """K, the most layers one roll proposes."""
        return self.config.num_proposals

    def bind(self, main: nn.Module) -> 'FeatureDraft':
        """Use `main`'s LayerEmbedding and RFSQHead (frozen, not part of this module)."""
        sizes = (main.hidden_size, main.num_layers, main.codes_per_layer, main.levels)
        c = self.config
        own = (c.hidden_size, c.num_layers, c.codes_per_layer, c.levels)
        if sizes != own:
            raise ValueError(f'v2 draft (H, L, C, V) = {own} does not match the main {sizes}')
        self._main[:] = [main.layer_embedding, main.rfsq_head]
        return self

    def set_statistics(self, features: torch.Tensor, embeds: torch.Tensor) -> None:
        """Standardisation from training trajectories: the main's features f_l and code
        embeddings e_l, [N, L, H] each (std floored at 1e-3 of the layer's mean std)."""
        for name, values in (('feature', features), ('embed', embeds)):
            std = values.std(0)                                                    # [L, H]
            std = std.clamp_min(1e-3 * std.mean(-1, keepdim=True).clamp_min(1e-6))
            getattr(self, f'{name}_mean').copy_(values.mean(0))
            getattr(self, f'{name}_std').copy_(std)

    def standardised(self, features: torch.Tensor, first_layer: int) -> torch.Tensor:
        """Features of layers first_layer.. [B, n, H] in z units (z_l above)."""
        layers = slice(first_layer, first_layer + features.shape[1])
        return (features - self.feature_mean[layers]) / self.feature_std[layers]

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        if not self._main:
            raise RuntimeError('v2 draft is not bound to a main model (call bind(main))')
        return self._main[0], self._main[1]

    def predict(self, features: torch.Tensor, embeds: torch.Tensor,
                first_layer: int) -> torch.Tensor:
        """features f_l.., embeds e_l.. [B, n, H] of layers first_layer.. -> predicted
        f_{l+1}.. [B, n, H] (position j sees positions <= j)."""
        n = features.shape[1]
        layers = slice(first_layer, first_layer + n)
        embeds = (embeds - self.embed_mean[layers]) / self.embed_std[layers]
        x = self.fuse(torch.cat([self.standardised(features, first_layer), embeds], -1))
        x = x + self.position(torch.arange(first_layer, first_layer + n,
                                           device=x.device))        # [B, n, d]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
        z = self.out(self.norm(self.trunk(x, src_mask=mask, is_causal=True)))    # [B, n, H]
        following = slice(first_layer + 1, first_layer + 1 + n)
        return self.feature_mean[following] + self.feature_std[following] * z

    def roll(self, hidden: torch.Tensor, codes: torch.Tensor, layer: int, k: int,
             teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """From the main's hidden state [B, H] that chose layer `layer` and that layer's codes
        [B, C], propose layers layer+1..layer+k on the draft's own predicted features.

        teacher [B, k, C]: codes embedded at the next steps instead of the draft's own greedy
        ones (training; under the prefix rule a later proposal only counts when the earlier
        ones equal the main's). Returns (logits [B, k, C, V], predicted features [B, k, H]).
        """
        if layer < 0 or layer + k > self.config.num_layers - 1:
            raise ValueError(f'cannot propose layers {layer + 1}..{layer + k} of '
                             f'{self.config.num_layers}')
        embed, head = self._parts()
        dtype = self.out.weight.dtype
        features, embeds, logits = [hidden.to(dtype)], [], []
        for step in range(k):
            embeds.append(embed(codes[:, None], layer + step)[:, 0].to(dtype))      # [B, H]
            predicted = self.predict(torch.stack(features, 1), torch.stack(embeds, 1),
                                     layer)[:, -1]                                   # [B, H]
            logits.append(head(predicted.to(head.proj.weight.dtype)))               # [B, C, V]
            codes = teacher[:, step] if teacher is not None else logits[-1].argmax(-1)
            features.append(predicted)
        return torch.stack(logits, 1), torch.stack(features[1:], 1)

    def proposal_logits(self, hidden: torch.Tensor, codes: torch.Tensor, layer: int,
                        k: int) -> torch.Tensor:
        """Logits [B, k, C, V] for layers layer+1..layer+k (the engine's draft interface)."""
        return self.roll(hidden, codes, layer, k)[0]

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """h0 [B, H] -> logits [B, K, C, V] for layers 1..K (layer 0 = the main's head(h0))."""
        _, head = self._parts()
        codes0 = head(h0.to(head.proj.weight.dtype)).argmax(-1)     # [B, C]
        return self.proposal_logits(h0, codes0, 0, self.num_proposals)

    def save(self, directory: str | Path, provenance: dict) -> Path:
        """Write draft.safetensors (only this module's tensors) + draft.json."""
        if not isinstance(provenance.get('main_weights_sha256'), str):
            raise ValueError('a v2 draft needs provenance main_weights_sha256: it uses that '
                             "main's head and embedding")
        provenance = {'trained': True, 'metrics': {},
                      'created': datetime.now(UTC).isoformat(timespec='seconds'), **provenance}
        manifest = {'format': FORMAT, 'version': VERSION, 'kind': KIND,
                    'config': asdict(self.config), 'provenance': provenance}
        return save_component(directory, NAME, self.state_dict(), manifest)

    @classmethod
    def load(cls, directory: str | Path, main: nn.Module, strict_provenance: bool = False,
             device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32,
             ) -> 'FeatureDraft':
        """Validate a v2 draft against `main` and build it bound to `main` (eval mode)."""
        weights, manifest_path = checkpoint_paths(directory)
        tensors = read_weights(weights)
        manifest = load_manifest(manifest_path, FORMAT)
        config = FeatureDraftConfig.from_dict(manifest.get('config'), manifest_path)
        sizes = (main.hidden_size, main.num_layers, main.codes_per_layer, main.levels)
        found = (config.hidden_size, config.num_layers, config.codes_per_layer, config.levels)
        problems = [] if found == sizes else [
            f'v2 draft made for a main with (H, L, C, V) = {found}, this main has {sizes}']
        with torch.device('meta'):
            shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        problems += key_problems(tensors, shapes)
        bad = non_finite_keys(tensors)
        if bad:
            problems.append(f'non-finite values (NaN/Inf) in {bad}')
        if problems:
            raise CheckpointError(f'{weights}: ' + '; '.join(problems))
        check_provenance(manifest, weights, main.weights_hash, strict_provenance)
        model = cls(config)
        model.load_state_dict(tensors, strict=True)
        return model.to(device=device, dtype=dtype).eval().bind(main)


def load_draft(directory: str | Path, main: nn.Module, strict_provenance: bool = False,
               device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32,
               ) -> DraftModel | FeatureDraft:
    """A draft directory of either kind, validated against `main` (see draft_kind)."""
    _, manifest_path = checkpoint_paths(directory)
    manifest = load_manifest(manifest_path, FORMAT)
    if draft_kind(manifest) == 'v2':
        return FeatureDraft.load(directory, main, strict_provenance, device, dtype)
    return DraftModel.load(directory, main.hidden_size, main.weights_hash, strict_provenance,
                           device, dtype)
