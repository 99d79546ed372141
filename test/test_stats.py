"""ChunkStats, StatsAggregator and the phase timer."""

import json
import threading
import time

import numpy as np
import pytest

from rsd_core.stats import PHASES, ChunkStats, StatsAggregator
from rsd_core.timing import PhaseTimer


def chunk(accepted: int, proposed: int = 3, total: float = 10.0, **fields) -> ChunkStats:
    return ChunkStats(total_ms=total, main_passes=8 - accepted if proposed else 8,
                      layers_proposed=proposed, layers_accepted=accepted,
                      accepted_by_depth=[d < accepted for d in range(proposed)],
                      used_draft=proposed > 0, acceptance='exact' if proposed else 'none',
                      **fields)


def test_chunk_stats_as_dict_is_json():
    stats = chunk(2, near_ties=1, max_deviation=0.01)
    data = json.loads(json.dumps(stats.as_dict()))
    assert data['accepted_by_depth'] == [True, True, False]
    assert {f'{p}_ms' for p in PHASES} <= set(data)
    assert ChunkStats(**data) == stats


def test_acceptance_is_derived_from_the_accepted_length_histogram():
    aggregator = StatsAggregator()
    for accepted in (0, 1, 1, 2, 3, 3, 3, 3):
        aggregator.add(chunk(accepted))
    aggregator.add(chunk(0, proposed=0))                     # main-only chunk
    summary = aggregator.summary()
    assert summary['chunks'] == 9 and summary['speculative_chunks'] == 8
    assert summary['accepted_length_hist'] == [1, 2, 1, 4]
    assert summary['proposed_length_hist'] == [0, 0, 0, 8]
    assert summary['acceptance_by_depth'] == [7 / 8, 5 / 8, 4 / 8]
    assert summary['mean_accepted_layers'] == pytest.approx(16 / 8)
    assert summary['layers_accepted'] == 16 <= summary['layers_proposed'] == 24
    assert sum(summary['accepted_length_hist']) == summary['speculative_chunks']
    assert summary['main_passes_total'] == sum(8 - a for a in (0, 1, 1, 2, 3, 3, 3, 3)) + 8
    json.dumps(summary)


def test_mixed_proposal_lengths_divide_by_chunks_that_reached_each_depth():
    aggregator = StatsAggregator()
    aggregator.add(chunk(1, proposed=1))
    aggregator.add(chunk(2, proposed=4))
    aggregator.add(chunk(4, proposed=4))
    summary = aggregator.summary()
    assert summary['acceptance_by_depth'] == [1.0, 1.0, 0.5, 0.5]


def test_latency_percentiles_and_window():
    aggregator = StatsAggregator(window=5)
    totals = [float(t) for t in range(1, 11)]
    for total in totals:
        aggregator.add(chunk(1, total=total, near_ties=1 if total == 10 else 0,
                             max_deviation=total / 100))
    summary = aggregator.summary()
    assert summary['chunks'] == 5
    assert summary['latency_ms']['total']['p50'] == np.percentile(totals[5:], 50)
    assert summary['latency_ms']['total']['p90'] == pytest.approx(np.percentile(totals[5:], 90))
    assert summary['near_ties'] == summary['chunks_with_near_ties'] == 1
    assert summary['max_deviation'] == pytest.approx(0.10)
    aggregator.reset()
    empty = aggregator.summary()
    assert empty['latency_ms']['total']['p50'] is None
    assert empty['mean_accepted_layers'] is None and empty['acceptance_by_depth'] == []


def test_aggregator_add_and_summary_from_two_threads():
    aggregator = StatsAggregator(window=50)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            summary = aggregator.summary()
            assert sum(summary['accepted_length_hist']) == summary['speculative_chunks']

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(2000):
        aggregator.add(chunk(i % 4))
    stop.set()
    thread.join()
    assert len(aggregator) == 50


def test_phase_timer_accumulates_repeated_and_nested_phases():
    timer = PhaseTimer('cpu')
    with timer.phase('total'):
        for _ in range(3):
            with timer.phase('step'):
                time.sleep(0.005)
    elapsed = timer.elapsed_ms()
    assert timer.count('step') == 3 and timer.count('draft') == 0
    assert elapsed['step'] >= 15.0
    assert elapsed['total'] >= elapsed['step']
