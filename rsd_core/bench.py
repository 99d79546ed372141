"""`rsd bench`: main-only vs speculative and certified-depth decoding on the same inputs.

Every input runs in every mode back to back (so machine load hits all alike) after a warm-up:
main_only; exact and tolerance (the draft, K chosen per chunk by the engine's planner);
exact_fixed (the draft forced to propose K every chunk: what the bet costs); bounded (certified
depth at the tolerance, draft verified exactly where the planner bets). Reported: latency
p50/p90 per phase, main passes per chunk, acceptance per layer depth, mean accepted layers,
speedup_p50 (main-only p50 / mode p50, same run) and the median of per-input latency ratios
(robust when machine load drifts), whether the exact modes gave main-only's actions, the
deviation of tolerance and bounded from main-only (action units) beside bounded's certificate,
the physical limit (prefill only / main-only: no layer step can do better), the cost model
P + (L-1)d vs P + D + v + (L-2-K)d with the measured times, the achieved weight bandwidth
(weight bytes x main passes / time) as gpt-fast reports it, and the per-layer report
(rsd_core.layer_report). With `--batch N`, batches of 1, 2, 4, .. N inputs in one mode
(rsd_core.batch_bench).
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from rsd_core.batch_bench import batch_table, batch_throughput
from rsd_core.engine import RSDEngine
from rsd_core.layer_report import format_layer_report, layer_report
from rsd_core.observations import load_image, read_observations
from rsd_core.stats import PHASES, StatsAggregator
from rsd_core.threads import torch_threads

logger = logging.getLogger(__name__)

MODES = {
    'main_only': {'use_draft': False, 'acceptance': 'exact'},
    'exact': {'use_draft': True, 'acceptance': 'exact', 'adaptive': True},
    'exact_fixed': {'use_draft': True, 'acceptance': 'exact', 'adaptive': False},
    'tolerance': {'use_draft': True, 'acceptance': 'tolerance', 'adaptive': True},
    'bounded': {'use_draft': True, 'acceptance': 'bounded', 'adaptive': True},
}
EXACT_MODES = ('exact', 'exact_fixed')
INSTRUCTIONS = (
    'pick up the black bowl between the plate and the ramekin and place it on the plate',
    'pick up the black bowl next to the ramekin and place it on the plate',
    'pick up the black bowl from table center and place it on the plate',
    'pick up the black bowl on the cookie box and place it on the plate',
    'pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate',
    'pick up the black bowl on the ramekin and place it on the plate',
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rsd bench` options."""
    parser.add_argument('--model', default=None,
                        help='main model bundle directory (default: the default bundle)')
    parser.add_argument('--draft', default=None,
                        help="draft directory (default: the bundle's draft/)")
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--dtype', default='float32',
                        choices=('float32', 'float64', 'float16', 'bfloat16'))
    parser.add_argument('-n', '--num-inputs', type=int, default=20,
                        help='inputs, each decoded in every mode (default 20)')
    parser.add_argument('--warmup', type=int, default=3, help='warm-up chunks per mode')
    parser.add_argument('--observations', default=None,
                        help='observation directory (index.jsonl + images/); default: '
                             'generated images')
    parser.add_argument('--tolerance', type=float, default=0.02,
                        help='tolerance of the tolerance and bounded modes, action units, '
                             'every dimension (0.02)')
    parser.add_argument('--num-proposals', type=int, default=None,
                        help="draft layers proposed per chunk, 1..draft K (default: draft's K)")
    parser.add_argument('--seed', type=int, default=0, help='seed of generated inputs')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch default); on a CPU shared with '
                             'other work, 1 gives much steadier numbers')
    parser.add_argument('--batch', type=int, default=0, metavar='N',
                        help='also decode batches of 1, 2, 4, .. N inputs (several arms sharing '
                             'one model): chunks/s and latency per batch size (default 0: off)')
    parser.add_argument('--batch-mode', default='main_only', choices=tuple(MODES),
                        help='decoding mode of the batch runs (default main_only)')
    parser.add_argument('--json', action='store_true', help='print the results as JSON')
    parser.add_argument('--plot', default='results/bench_latency.png',
                        help="latency breakdown chart path ('' = none)")


Input = tuple[np.ndarray, str, np.ndarray | None]  # image [S, S, 3] uint8, instruction, state


def generated_inputs(n: int, seed: int = 0, size: int = 128,
                     state: tuple[np.ndarray, np.ndarray] | None = None) -> list[Input]:
    """n (image, instruction, robot state) inputs: coloured boxes on a noisy table; the state
    is drawn from N(mean, std) per value when `state` = (mean [P], std [P]) is given, else None.
    """
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(n):
        image = (rng.normal(120, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
        for _ in range(rng.integers(2, 6)):
            y, x = rng.integers(0, size - 16, 2)
            h, w = rng.integers(8, 40, 2)
            image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        proprio = None if state is None else \
            (state[0] + state[1] * rng.standard_normal(len(state[0]))).astype(np.float32)
        inputs.append((image, INSTRUCTIONS[i % len(INSTRUCTIONS)], proprio))
    return inputs


def state_statistics(engine: RSDEngine) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean [P], std [P]) of the robot state the main model was trained on, or None."""
    encoder = engine.main.proprio
    if encoder is None:
        return None
    return encoder.mean.float().cpu().numpy(), encoder.std.float().cpu().numpy()


def observation_inputs(directory: str | Path, n: int) -> list[Input]:
    """The first n usable entries of an observation directory (rsd_core.observations), with
    the robot state when the entries record one. ValueError when there are none."""
    observations = read_observations(directory)[:n]
    if not observations:
        raise ValueError(f'{directory}: no usable observations')
    return [(load_image(o.image), o.instruction, o.proprio) for o in observations]


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters (the whole main model: an upper bound on what one step reads,
    the vision tower only runs in prefill)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run_modes(engine: RSDEngine, inputs: list[Input], warmup: int,
              ) -> dict[str, tuple[StatsAggregator, np.ndarray]]:
    """Decode every input in every mode; return per mode (stats, actions [N, T, A])."""
    for i in range(warmup):
        image, instruction, proprio = inputs[i % len(inputs)]
        for mode in MODES.values():
            engine.update_config(**mode)
            engine.predict(image, instruction, proprio=proprio)
    results = {name: (StatsAggregator(), []) for name in MODES}
    for image, instruction, proprio in inputs:
        for name, mode in MODES.items():
            engine.update_config(**mode)
            actions, stats = engine.predict(image, instruction, proprio=proprio)
            results[name][0].add(stats)
            results[name][1].append(actions)
    return {name: (agg, np.stack(actions)) for name, (agg, actions) in results.items()}


def paired_speedup(reference: StatsAggregator, other: StatsAggregator) -> float:
    """Median over inputs of reference / other total latency of the same input (robust to
    load that drifts during the run)."""
    ratios = [a.total_ms / b.total_ms for a, b in zip(reference.chunks(), other.chunks(),
                                                       strict=True)]
    return float(np.median(ratios))


def all_accepted_rounds(num_layers: int, k: int, rolls: bool) -> tuple[int, int]:
    """(speculative rounds, single steps) of a chunk whose every proposal is accepted, as
    `speculative_rounds` runs them: each round decides up to k + 1 layers, a rolling (v2) draft
    goes on from the last decided layer while a proposal fits."""
    decided, rounds = 1, 0
    while rounds == 0 or rolls:
        k_step = min(k, num_layers - 1 - decided)
        if k_step < 1:
            break
        decided, rounds = decided + k_step + 1, rounds + 1
    return rounds, num_layers - decided


def cost_model(summaries: dict[str, dict], num_layers: int, k: int, rounds: float,
               rolls: bool) -> dict:
    """Measured P, d, D, v (p50, ms; D and v per speculative round, from the forced draft,
    whose chunks ran `rounds` rounds on average) and the latencies they predict."""
    main, exact = summaries['main_only'], summaries['exact_fixed']
    p = main['latency_ms']['prefill']['p50']
    d = main['latency_ms']['step']['p50'] / (num_layers - 1)
    rounds = max(rounds, 1.0)
    draft = exact['latency_ms']['draft']['p50'] / rounds
    v = exact['latency_ms']['verify']['p50'] / rounds
    accepted = exact['mean_accepted_layers']
    best_rounds, best_steps = all_accepted_rounds(num_layers, k, rolls)
    return {
        'prefill_P_ms': p, 'step_d_ms': d, 'draft_D_ms': draft, 'verify_v_ms': v,
        'rounds_per_chunk': rounds, 'verify_over_step': v / d if d else None,
        'main_only_ms': p + (num_layers - 1) * d,
        'speculative_all_accepted_ms': p + best_rounds * (draft + v) + best_steps * d,
        'speculative_measured_acceptance_ms':
            p + rounds * (draft + v) + (num_layers - 1 - accepted - rounds) * d,
        'speculative_all_accepted_v_eq_d_ms': p + best_rounds * (draft + d) + best_steps * d,
    }


def bench(args: argparse.Namespace) -> dict:
    """Run every input in every mode (see the module docstring); return the JSON-ready result.

    Latencies in ms, deviations in action units, bandwidth in GB/s. `args.threads` (torch CPU
    threads) applies only while the benchmark runs; the previous setting is restored.
    """
    if args.num_inputs < 1 or args.warmup < 0 or args.batch < 0:
        raise ValueError('--num-inputs must be >= 1, --warmup and --batch >= 0')
    with torch_threads(args.threads or None):
        return _bench(args)


def _bench(args: argparse.Namespace) -> dict:
    """`bench` at the current torch thread setting."""
    config = {'tolerance': args.tolerance}
    if args.num_proposals is not None:
        config['num_proposals'] = args.num_proposals
    engine = RSDEngine.from_dirs(args.model, args.draft, device=args.device, dtype=args.dtype,
                                 **config)
    if engine.draft is None:
        raise ValueError('no draft model: pass --draft DIR or build a bundle with a draft/')
    if args.observations:
        inputs = observation_inputs(args.observations, args.num_inputs)
    else:
        inputs = generated_inputs(args.num_inputs, args.seed, state=state_statistics(engine))
    logger.info('benchmarking %d inputs x %d modes (+%d warm-up)', len(inputs), len(MODES),
                args.warmup)
    runs = run_modes(engine, inputs, args.warmup)
    summaries = {name: agg.summary() for name, (agg, _) in runs.items()}
    main_actions = runs['main_only'][1]
    identical = [bool(np.array_equal(runs[name][1][i], main_actions[i]))
                 for name in EXACT_MODES for i in range(len(inputs))]
    deviation = np.abs(runs['tolerance'][1] - main_actions)                 # [N, T, A]
    k = engine.config.num_proposals or engine.draft.num_proposals
    main_p50 = summaries['main_only']['latency_ms']['total']['p50']
    num_layers = engine.main.num_layers
    bytes_ = weight_bytes(engine.main)
    others = [name for name in MODES if name != 'main_only']
    rounds = float(np.mean([c.rounds for c in runs['exact_fixed'][0].chunks()]))
    batch = {}
    if args.batch:
        engine.update_config(**MODES[args.batch_mode])
        logger.info('batches of up to %d inputs (%s)', args.batch, args.batch_mode)
        batch = {'batch_mode': args.batch_mode,
                 'batch': batch_throughput(engine, inputs, args.batch, len(inputs),
                                           args.warmup)}
    return {
        'model': str(args.model or 'default bundle'), 'draft': str(args.draft or 'bundle draft'),
        'device': str(engine.device), 'dtype': args.dtype, 'threads': torch.get_num_threads(),
        'num_inputs': len(inputs),
        'warmup': args.warmup, 'inputs': args.observations or f'generated (seed {args.seed})',
        'num_proposals': k, 'tolerance': args.tolerance, 'num_layers': num_layers,
        'modes': summaries,
        'speedup_p50': {name: main_p50 / summaries[name]['latency_ms']['total']['p50']
                        for name in others},
        'speedup_paired_median': {name: paired_speedup(runs['main_only'][0], runs[name][0])
                                  for name in others},
        'identical_actions': sum(identical), 'identical_actions_of': len(identical),
        'identical_actions_all': all(identical),
        'tolerance_max_deviation': float(deviation.max()),
        'tolerance_max_deviation_per_dim': deviation.max(axis=(0, 1)).tolist(),
        'bounded': bounded_summary(runs['bounded'], main_actions),
        'physical_limit': physical_limit(runs['main_only'][0]),
        'cost_model': cost_model(summaries, num_layers, k, rounds, engine.draft.rolls),
        'weight_bytes': bytes_,
        'bandwidth_gb_s': {name: bytes_ * s['main_passes']['mean']
                           / (s['latency_ms']['total']['mean'] * 1e-3) / 1e9
                           for name, s in summaries.items()},
        'layers': layer_report(engine, inputs),
        **batch,
    }


def bounded_summary(run: tuple[StatsAggregator, np.ndarray], main_actions: np.ndarray) -> dict:
    """Certified depth against main-only on the same inputs (action units)."""
    chunks = run[0].chunks()
    deviation = np.abs(run[1] - main_actions)                              # [N, T, A]
    return {
        'max_deviation_vs_main_only': float(deviation.max()),
        'certified_bound_max': max(c.certified_bound for c in chunks),
        'certified_bound_median': float(np.median([c.certified_bound for c in chunks])),
        'mean_layers_decoded': float(np.mean([c.layers_decoded for c in chunks])),
        'layers_decoded_hist': np.bincount([c.layers_decoded for c in chunks]).tolist(),
        'deviation_within_certificate': bool(all(
            (d <= c.certified_bound).all() for d, c in zip(deviation, chunks, strict=True))),
    }


def physical_limit(main_only: StatsAggregator) -> dict:
    """What no layer-skipping can beat: the chunk's time without any layer step (preprocess,
    prefill and decode of main-only chunks, medians), against main-only."""
    chunks = main_only.chunks()
    fixed = np.median([c.preprocess_ms + c.prefill_ms + c.decode_ms for c in chunks])
    total = np.median([c.total_ms for c in chunks])
    return {'prefill_only_ms': float(fixed), 'main_only_ms': float(total),
            'prefill_only_over_main_only': float(fixed / total),
            'speedup_limit': float(total / fixed)}


def fmt(value: float | None, spec: str = '.1f') -> str:
    """`value` formatted with `spec`, or '-' when it is None (a phase or rate not measured)."""
    return '-' if value is None else format(value, spec)


def table(result: dict) -> str:
    """A readable multi-line summary of a bench result."""
    modes = result['modes']
    lines = [f"rsd bench: {result['num_inputs']} inputs ({result['inputs']}), "
             f"{result['device']} {result['dtype']}, threads={result['threads']}, "
             f"K={result['num_proposals']}, "
             f"tolerance {result['tolerance']} action units", '',
             f"{'mode':<11}{'p50 ms':>9}{'p90 ms':>9}{'passes':>8}{'accepted':>10}"
             f"{'speedup':>9}{'paired':>9}{'near ties':>11}{'weight GB/s':>13}"]
    for name, s in modes.items():
        latency = s['latency_ms']['total']
        speedup = result['speedup_p50'].get(name, 1.0)
        paired = result['speedup_paired_median'].get(name, 1.0)
        lines.append(f"{name:<11}{fmt(latency['p50']):>9}{fmt(latency['p90']):>9}"
                     f"{fmt(s['main_passes']['mean'], '.2f'):>8}"
                     f"{fmt(s['mean_accepted_layers'], '.2f'):>10}{speedup:>8.2f}x"
                     f"{paired:>8.2f}x"
                     f"{s['near_ties']:>11}{result['bandwidth_gb_s'][name]:>13.2f}")
    lines += ['', 'phase p50 ms   ' + ''.join(f'{p:>11}' for p in PHASES)]
    for name, s in modes.items():
        lines.append(f'{name:<15}' + ''.join(f"{fmt(s['latency_ms'][p]['p50'], '.2f'):>11}"
                                             for p in PHASES))
    for name in ('exact', 'exact_fixed', 'tolerance', 'bounded'):
        rates = ', '.join(fmt(r, '.2f') for r in modes[name]['acceptance_by_depth'])
        lines.append(f"acceptance by depth ({name}): [{rates}]; K chosen per chunk "
                     f"(histogram 0..): {modes[name]['proposed_length_hist']}")
    lines.append(f"exact modes == main-only actions: {result['identical_actions']}/"
                 f"{result['identical_actions_of']}")
    lines.append(f"tolerance vs main-only max |deviation|: "
                 f"{result['tolerance_max_deviation']:.4f} action units")
    b = result['bounded']
    lines.append(f"bounded: {b['mean_layers_decoded']:.2f} layers decoded on average; max "
                 f"|deviation| vs main-only {b['max_deviation_vs_main_only']:.5f} <= certified "
                 f"{b['certified_bound_max']:.5f} <= tolerance {result['tolerance']} "
                 f"(action units); within the certificate: {b['deviation_within_certificate']}")
    limit = result['physical_limit']
    lines.append(f"physical limit: prefill only {limit['prefill_only_ms']:.1f} ms / main-only "
                 f"{limit['main_only_ms']:.1f} ms = {limit['prefill_only_over_main_only']:.2f} "
                 f"(no layer skipping beats {limit['speedup_limit']:.2f}x)")
    c = result['cost_model']
    lines.append(f"cost model (ms): P={c['prefill_P_ms']:.2f} d={c['step_d_ms']:.2f} "
                 f"D={c['draft_D_ms']:.2f} v={c['verify_v_ms']:.2f} per round "
                 f"({c['rounds_per_chunk']:.1f} rounds a chunk); main-only P+7d = "
                 f"{c['main_only_ms']:.1f}; speculative P+rounds(D+v)+steps*d = "
                 f"{c['speculative_all_accepted_ms']:.1f} (all accepted), "
                 f"{c['speculative_measured_acceptance_ms']:.1f} (measured acceptance)")
    lines += ['', format_layer_report(result['layers'])]
    if 'batch' in result:
        lines += ['', f"batches ({result['batch_mode']}, each chunk's latency is its batch "
                      "call's):", batch_table(result['batch'])]
    return '\n'.join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Left: stacked bars of the median time per phase for each mode. Right: per layer depth,
    what stopping there measurably changes, the certificate, and the tolerance (log scale)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result['modes'])
    figure, (axes, depth_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = np.zeros(len(names))
    for phase in PHASES + ('other',):
        if phase == 'other':
            values = np.array([result['modes'][n]['latency_ms']['total']['p50'] for n in names])
            values = (values - bottom).clip(min=0)
        else:
            values = np.array([result['modes'][n]['latency_ms'][phase]['p50'] for n in names])
        axes.bar(names, values, bottom=bottom, label=phase)
        bottom += values
    axes.set_ylim(0, bottom.max() * 1.1)
    axes.set_ylabel('median time per chunk (ms)')
    axes.set_title(f"RSD latency per phase (medians), K={result['num_proposals']}, "
                   f"{result['device']} {result['dtype']}")
    axes.tick_params(axis='x', labelsize='small')
    axes.legend(fontsize='small', loc='upper right')
    rows = [r for r in result['layers'] if r['layer']]
    depths = [r['layer'] for r in rows]
    for key, label, style in (('truncation_change_median', 'measured change (median)', 'o-'),
                              ('truncation_change_max', 'measured change (max)', 'o--'),
                              ('certified_bound_max', 'certified bound (max)', 's-'),
                              ('witness_max', 'witness: codes reaching (max)', 'x:')):
        depth_axes.semilogy(depths, [max(r[key], 1e-9) for r in rows], style, label=label)
    depth_axes.axhline(result['tolerance'], color='k', lw=0.8, label='tolerance')
    depth_axes.set_xlabel('layers decoded (depth m)')
    depth_axes.set_ylabel('max |action change| from layers m..L-1 (action units)')
    depth_axes.set_title('what the undecoded layers can still change')
    depth_axes.legend(fontsize='small')
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> int:
    """`rsd bench`: print the table (or JSON), write the chart; exit 2 on bad input."""
    try:
        result = bench(args)
    except (ValueError, FileNotFoundError) as exc:
        logger.error('%s', exc)
        return 2
    if args.plot:
        result['plot'] = str(plot(result, args.plot))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
