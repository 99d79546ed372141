#!/usr/bin/env python3
"""Trained draft vs the same draft with its input projection freshly re-initialised.

On the same inputs, decodes every chunk main-only, then with each draft in exact and in
tolerance mode, and prints a table of medians: latency, paired speed-up over main-only,
accepted layers, acceptance by depth, whether exact mode reproduced main-only, and the largest
tolerance-mode deviation. The re-initialised projection exists only inside this script (it
reproduces the failure the project guards against); the engine itself never builds one.

    python scripts/compare_draft_projection.py [--model DIR] [--draft DIR] [-n 20]
"""

import argparse
import copy
import json
import logging
from pathlib import Path
import sys

import numpy as np
import torch

from rsd_core.bench import generated_inputs, observation_inputs, paired_speedup, state_statistics
from rsd_core.engine import RSDEngine
from rsd_core.stats import StatsAggregator

logger = logging.getLogger('compare_draft_projection')

MODES = {'exact': {'use_draft': True, 'acceptance': 'exact'},
         'tolerance': {'use_draft': True, 'acceptance': 'tolerance'}}


def reinitialised_projection(engine: RSDEngine, seed: int) -> RSDEngine:
    """An engine sharing main and tokenizer, whose draft is a copy of engine's draft with
    `input_proj` reset to PyTorch's default random initialisation."""
    draft = copy.deepcopy(engine.draft)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft.input_proj.reset_parameters()
    return RSDEngine(engine.main, engine.tokenizer, draft, engine.config)


def decode_all(engines: dict[str, RSDEngine], inputs: list, warmup: int) -> dict:
    """Per run name ('main_only', '<draft>/<mode>'): (stats aggregator, actions [N, T, A])."""
    runs = [('main_only', engines['trained'], {'use_draft': False})]
    runs += [(f'{name}/{mode}', engine, config) for name, engine in engines.items()
             for mode, config in MODES.items()]
    for i in range(warmup):
        image, instruction, proprio = inputs[i % len(inputs)]
        for _, engine, config in runs:
            engine.update_config(**config)
            engine.predict(image, instruction, proprio=proprio)
    results = {name: (StatsAggregator(), []) for name, _, _ in runs}
    for image, instruction, proprio in inputs:   # interleaved: load drift hits every run alike
        for name, engine, config in runs:
            engine.update_config(**config)
            actions, stats = engine.predict(image, instruction, proprio=proprio)
            results[name][0].add(stats)
            results[name][1].append(actions)
    return {name: (agg, np.stack(actions)) for name, (agg, actions) in results.items()}


def summarise(results: dict) -> list[dict]:
    reference, main_actions = results['main_only']
    rows = []
    for name, (agg, actions) in results.items():
        chunks = agg.chunks()
        row = {'run': name,
               'median_total_ms': float(np.median([c.total_ms for c in chunks])),
               'speedup': paired_speedup(reference, agg),
               'median_main_passes': float(np.median([c.main_passes for c in chunks]))}
        if name != 'main_only':
            depth = np.array([c.accepted_by_depth for c in chunks], dtype=float)  # [N, K]
            deviation = np.abs(actions - main_actions).max(axis=(1, 2))            # [N]
            row.update(mean_accepted_layers=float(np.mean([c.layers_accepted for c in chunks])),
                       acceptance_by_depth=depth.mean(0).tolist(),
                       identical_to_main=float(np.mean(deviation == 0.0)),
                       max_deviation=float(deviation.max()))
        rows.append(row)
    return rows


def format_table(rows: list[dict], args: argparse.Namespace, k: int) -> str:
    header = (f'{"run":<30}{"median ms":>11}{"speed-up":>10}{"passes":>8}{"accepted":>10}'
              f'  {"by depth 1..K":<22}{"= main":>8}{"max dev":>10}')
    lines = [f'{args.num_inputs} inputs, K = {k}, tolerance {args.tolerance} action units; '
             'medians (speed-up: median of per-input main-only / run latency)', header]
    for row in rows:
        line = (f'{row["run"]:<30}{row["median_total_ms"]:>11.1f}{row["speedup"]:>10.2f}'
                f'{row["median_main_passes"]:>8.0f}')
        if 'mean_accepted_layers' in row:
            depth = ' '.join(f'{d:.2f}' for d in row['acceptance_by_depth'])
            line += (f'{row["mean_accepted_layers"]:>10.2f}  {depth:<22}'
                     f'{row["identical_to_main"]:>8.2f}{row["max_deviation"]:>10.4f}')
        lines.append(line)
    return '\n'.join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default=None, help='main bundle (default: default bundle)')
    parser.add_argument('--draft', default=None,
                        help='trained draft directory (default: <model>/draft)')
    parser.add_argument('--observations', default=None,
                        help='observation directory to take inputs from (default: generated)')
    parser.add_argument('-n', '--num-inputs', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2, help='warm-up chunks per run')
    parser.add_argument('--tolerance', type=float, default=0.05,
                        help='tolerance mode bound, action units, every dimension')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the generated inputs and of the re-initialisation')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--json', action='store_true', help='print the rows as JSON')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = RSDEngine.from_dirs(args.model, args.draft, device=args.device,
                                 tolerance=args.tolerance)
    if engine.draft is None:
        logger.error('no draft to compare: pass --draft DIR or build one with rsd train-draft')
        return 1
    engines = {'trained': engine, 'reinit_projection': reinitialised_projection(engine,
                                                                                args.seed)}
    inputs = (observation_inputs(Path(args.observations), args.num_inputs)
              if args.observations else generated_inputs(args.num_inputs, seed=args.seed + 1,
                                                         state=state_statistics(engine)))
    rows = summarise(decode_all(engines, inputs, args.warmup))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, args, engine.draft.num_proposals))
    return 0


if __name__ == '__main__':
    sys.exit(main())
