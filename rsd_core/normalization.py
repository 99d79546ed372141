"""Per-dimension action statistics: actions in action units <-> the tokenizer's normalised range.

Two modes, both an affine map per dimension:
- 'quantile': the 1 % and 99 % quantiles (`low`, `high`) map to -1 and +1; normalised values are
  clipped to [-1, 1], so outliers saturate (the OpenVLA convention).
- 'meanstd': (x - mean) / std, not clipped.

Degenerate dimensions never divide by zero. In quantile mode a dimension whose q01 == q99 but
which does vary (a gripper that is almost always open) falls back to its min/max, so rare values
are kept. A dimension whose range (or std) is below `EPS` is constant: it normalises to 0 and
un-normalises to its constant value (centre of `low`/`high`, or `mean`).

The statistics are buffers of this module, so they travel inside the tokenizer's safetensors file
(keys `normalizer.low`/`normalizer.high` or `normalizer.mean`/`normalizer.std`); the mode is
recorded in the tokenizer's manifest.
"""

import numpy as np
import torch
from torch import nn

MODES = ('quantile', 'meanstd')
STAT_KEYS = {'quantile': ('low', 'high'), 'meanstd': ('mean', 'std')}
EPS = 1e-6  # action units: a smaller range or std counts as a constant dimension
QUANTILES = (0.01, 0.99)


class ActionNormalizer(nn.Module):
    """Normalise / un-normalise actions [..., A] with per-dimension statistics [A]."""

    def __init__(self, mode: str, stats: dict[str, torch.Tensor]):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f'normaliser mode {mode!r} is not one of {list(MODES)}')
        keys = STAT_KEYS[mode]
        if set(stats) != set(keys):
            raise ValueError(f'{mode} normaliser needs statistics {list(keys)}, '
                             f'got {sorted(stats)}')
        first, second = (torch.as_tensor(stats[k], dtype=torch.float32) for k in keys)
        if first.ndim != 1 or first.shape != second.shape or first.numel() == 0:
            raise ValueError(f'{mode} normaliser statistics must be two vectors [A] of the same '
                             f'length, got shapes {list(first.shape)} and {list(second.shape)}')
        if not bool(torch.isfinite(first).all() and torch.isfinite(second).all()):
            raise ValueError(f'{mode} normaliser statistics hold NaN or Inf')
        if mode == 'quantile' and bool((second < first).any()):
            raise ValueError(f'quantile normaliser has high < low in dimensions '
                             f'{torch.nonzero(second < first).flatten().tolist()}')
        if mode == 'meanstd' and bool((second < 0).any()):
            raise ValueError(f'meanstd normaliser has negative std in dimensions '
                             f'{torch.nonzero(second < 0).flatten().tolist()}')
        self.mode = mode
        for key, value in zip(keys, (first, second), strict=True):
            self.register_buffer(key, value)

    @property
    def action_dim(self) -> int:
        """A, the number of action dimensions."""
        return int(self.get_buffer(STAT_KEYS[self.mode][0]).numel())

    @classmethod
    def identity(cls, action_dim: int) -> 'ActionNormalizer':
        """Quantile normaliser with low -1, high +1: the identity on [-1, 1]."""
        return cls('quantile', {'low': -torch.ones(action_dim), 'high': torch.ones(action_dim)})

    @classmethod
    def fit(cls, actions: np.ndarray | torch.Tensor, mode: str = 'quantile') -> 'ActionNormalizer':
        """Statistics of `actions` [N, A] (action units), computed in float64."""
        if mode not in MODES:
            raise ValueError(f'normaliser mode {mode!r} is not one of {list(MODES)}')
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        data = np.asarray(actions, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f'normaliser fit expects actions [N, A] with N, A >= 1, got shape '
                             f'{list(data.shape)}')
        if not np.isfinite(data).all():
            raise ValueError('normaliser fit: actions hold NaN or Inf')
        if mode == 'meanstd':
            stats = {'mean': data.mean(axis=0), 'std': data.std(axis=0)}
        else:
            low, high = np.quantile(data, QUANTILES, axis=0)
            narrow = high - low <= EPS  # e.g. a gripper that switches in < 1 % of the steps
            low = np.where(narrow, data.min(axis=0), low)
            high = np.where(narrow, data.max(axis=0), high)
            stats = {'low': low, 'high': high}
        return cls(mode, {k: torch.from_numpy(v) for k, v in stats.items()})

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], mode: str) -> 'ActionNormalizer':
        """Rebuild from `state_dict()` output (keys without the `normalizer.` prefix)."""
        return cls(mode, dict(tensors))

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-dimension (offset, scale, varies) with normalised = (x - offset) / scale."""
        first, second = (self.get_buffer(k) for k in STAT_KEYS[self.mode])
        if self.mode == 'quantile':
            return (first + second) / 2, (second - first) / 2, second - first > EPS
        return first, second, second > EPS

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.action_dim:
            raise ValueError(f'expected actions [..., {self.action_dim}], got shape '
                             f'{list(x.shape)}')

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Action units [..., A] -> normalised [..., A] (constant dimensions give 0)."""
        self._check(actions)
        offset, scale, varies = self._affine()
        x = torch.where(varies, (actions - offset) / torch.where(varies, scale, 1.0), 0.0)
        return x.clamp(-1.0, 1.0) if self.mode == 'quantile' else x

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [..., A] -> action units [..., A] (constant dimensions give the constant)."""
        self._check(x)
        offset, scale, varies = self._affine()
        return torch.where(varies, x * scale + offset, offset)

    def gain(self) -> torch.Tensor:
        """Per dimension, how much one normalised unit moves the action: [A] action units
        (0 for constant dimensions). |unnormalize(x) - unnormalize(y)| = gain * |x - y|."""
        _, scale, varies = self._affine()
        return torch.where(varies, scale.abs(), 0.0)

    def degenerate_dims(self) -> list[int]:
        """Indices of the dimensions treated as constant."""
        return torch.nonzero(~self._affine()[2]).flatten().tolist()

    def extra_repr(self) -> str:
        """Mode and action dim, for the module's repr."""
        return f'mode={self.mode!r}, action_dim={self.action_dim}'
