"""Per-chunk engine statistics and their aggregation.

As in gpt-fast, acceptance is not tracked separately: the aggregator keeps a histogram of
accepted lengths (and of proposed lengths) and derives the acceptance rate per layer depth and
the mean accepted length from it.
"""

from collections import deque
from dataclasses import asdict, dataclass, field
import threading

import numpy as np

# Timed phases of one chunk, in pipeline order (each a `<phase>_ms` field of ChunkStats).
PHASES = ('preprocess', 'prefill', 'draft', 'verify', 'accept', 'step', 'certify', 'decode')


@dataclass
class ChunkStats:
    """What one `predict` call cost and how the draft fared. Times in milliseconds."""

    total_ms: float = 0.0
    preprocess_ms: float = 0.0      # image + prompt -> model inputs
    prefill_ms: float = 0.0         # main prompt forward (layer 0)
    draft_ms: float = 0.0           # draft forward
    verify_ms: float = 0.0          # main forward over [layer 0, proposals]
    accept_ms: float = 0.0          # acceptance rule (tolerance mode decodes candidates)
    step_ms: float = 0.0            # all single-layer main steps together
    certify_ms: float = 0.0         # certified-depth checks (bounded mode)
    decode_ms: float = 0.0          # RFSQ decode + un-normalise
    main_passes: int = 0            # main-model forward passes (prefill + verify + steps)
    layers_proposed: int = 0        # K used for this chunk (0 without draft)
    layers_accepted: int = 0        # accepted prefix of the proposals, 0..K
    rounds: int = 0                 # speculative rounds (proposals verified; > 1: a v2 roll)
    accepted_by_depth: list[bool] = field(default_factory=list)   # len K, depth 1..K
    near_ties: int = 0              # main codes whose top-2 gap was below the dtype threshold
    max_deviation: float = 0.0      # action units, largest accepted change (tolerance mode)
    used_draft: bool = False        # the draft proposed layers for this chunk (K > 0)
    acceptance: str = 'none'        # 'exact' | 'tolerance' | 'bounded' | 'none' (main-only)
    layers_decoded: int = 0         # layers the chunk was decoded from (L unless bounded)
    certified_bound: float | None = None  # action units, largest certified bound (bounded)

    def as_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)


def _hist(values: list[int], size: int) -> list[int]:
    return np.bincount(np.asarray(values, dtype=np.int64), minlength=size).tolist()


class StatsAggregator:
    """Latency percentiles and acceptance over the last `window` chunks (all if None).

    Thread-safe: a worker may `add` while another thread reads `summary`.
    """

    def __init__(self, window: int | None = None) -> None:
        self._chunks: deque[ChunkStats] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, stats: ChunkStats) -> None:
        """Append one chunk's stats (the oldest drops out of a full window)."""
        with self._lock:
            self._chunks.append(stats)

    def reset(self) -> None:
        """Forget every chunk."""
        with self._lock:
            self._chunks.clear()

    def __len__(self) -> int:
        return len(self._chunks)

    def chunks(self) -> list[ChunkStats]:
        """The chunks in the window, oldest first."""
        with self._lock:
            return list(self._chunks)

    def summary(self) -> dict:
        """JSON-serialisable summary.

        latency_ms[phase] = {p50, p90, mean}; accepted_length_hist[a] = speculative chunks
        with a accepted layers; proposed_length_hist[k] = speculative chunks that proposed k;
        acceptance_by_depth[d-1] = fraction of chunks proposing depth d whose layer d was
        accepted (None if none proposed it); mean_accepted_layers over speculative chunks;
        k_chosen = proposals per chunk over all chunks (0 = the planner bet nothing);
        layers_decoded per chunk; certified_bound_max over bounded chunks (None if none).
        """
        chunks = self.chunks()
        speculative = [c for c in chunks if c.used_draft]
        size = max([c.layers_proposed for c in speculative], default=0) + 1
        accepted = _hist([c.layers_accepted for c in speculative], size)
        proposed = _hist([c.layers_proposed for c in speculative], size)
        return {
            'chunks': len(chunks),
            'speculative_chunks': len(speculative),
            'latency_ms': {phase: self._percentiles([getattr(c, f'{phase}_ms') for c in chunks])
                           for phase in ('total',) + PHASES},
            'main_passes': self._percentiles([c.main_passes for c in chunks]),
            'main_passes_total': sum(c.main_passes for c in chunks),
            'accepted_length_hist': accepted,
            'proposed_length_hist': proposed,
            'acceptance_by_depth': [sum(accepted[d:]) / sum(proposed[d:])
                                    if sum(proposed[d:]) else None for d in range(1, size)],
            'mean_accepted_layers': (sum(a * n for a, n in enumerate(accepted)) / len(speculative)
                                     if speculative else None),
            'layers_proposed': sum(c.layers_proposed for c in chunks),
            'layers_accepted': sum(c.layers_accepted for c in chunks),
            'near_ties': sum(c.near_ties for c in chunks),
            'chunks_with_near_ties': sum(c.near_ties > 0 for c in chunks),
            'max_deviation': max((c.max_deviation for c in chunks), default=0.0),
            'k_chosen': self._percentiles([c.layers_proposed for c in chunks]),
            'layers_decoded': self._percentiles([c.layers_decoded for c in chunks]),
            'certified_bound_max': max((c.certified_bound for c in chunks
                                        if c.certified_bound is not None), default=None),
        }

    @staticmethod
    def _percentiles(values: list[float]) -> dict:
        if not values:
            return {'p50': None, 'p90': None, 'mean': None}
        array = np.asarray(values, dtype=np.float64)
        return {'p50': float(np.percentile(array, 50)), 'p90': float(np.percentile(array, 90)),
                'mean': float(array.mean())}
