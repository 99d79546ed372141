"""The engine's runtime switches (`EngineConfig`), validated when built."""

from dataclasses import dataclass

import numpy as np

from rsd_core.acceptance import MODES


@dataclass(frozen=True)
class EngineConfig:
    """Runtime switches of the engine. Frozen: change with `RSDEngine.update_config`.

    acceptance: 'exact' | 'tolerance' (rules for draft layers) | 'bounded' (certified depth;
        a draft, if used, is verified exactly on the layers decoded).
    tolerance: action units, one value for every dimension or one per dimension (tolerance and
        bounded modes).
    num_proposals: most layers the draft proposes per chunk, 1..draft K (None = the draft's K).
    adaptive: choose the number of proposals per chunk (0..num_proposals) from measured
        acceptance and costs; False always proposes num_proposals.
    """

    use_draft: bool = True
    acceptance: str = 'exact'
    tolerance: float | tuple[float, ...] = 0.05
    num_proposals: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        for name in ('use_draft', 'adaptive'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'{name} must be a bool, got {getattr(self, name)!r}')
        if self.acceptance not in MODES:
            raise ValueError(f'acceptance must be one of {MODES}, got {self.acceptance!r}')
        try:
            values = np.atleast_1d(np.asarray(self.tolerance, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f'tolerance must be numbers in action units, got '
                             f'{self.tolerance!r}') from exc
        if values.ndim != 1 or not values.size or not (np.isfinite(values).all()
                                                       and (values >= 0).all()):
            raise ValueError(f'tolerance must be one value or one per action dim, finite and '
                             f'>= 0 (action units), got {self.tolerance!r}')
        values = tuple(float(v) for v in values)
        object.__setattr__(self, 'tolerance', values[0] if len(values) == 1 else values)
        k = self.num_proposals
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f'num_proposals must be None or an integer >= 1, got {k!r}')
