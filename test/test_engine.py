"""RSDEngine on the real tiny LLaVA bundle: exactness, pass counts, tolerance bound, stats.

Every reference here is computed independently of the engine: main-only greedy tokens by
re-running the prompt and ALL layers so far in one pass per layer (no cache reuse), the main's
choices after a draft prefix by single-position steps, deviations by decoding one layer at a time.
"""

from contextlib import contextmanager
import copy
import json
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsd_core import bench
from rsd_core.draft import DraftConfig, DraftModel
from rsd_core.engine import EngineConfig, NonFiniteLogitsError, RSDEngine
from rsd_core.stats import StatsAggregator
from rsd_core.tokenizer import codes_to_tokens

INSTRUCTIONS = ('pick up the black bowl next to the ramekin and place it on the plate',
                'open the middle drawer of the cabinet', 'turn on the stove')


def random_inputs(n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (int(rng.integers(40, 130)), int(rng.integers(40, 130)), 3),
                          dtype=np.uint8), INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(n)]


INPUTS = random_inputs(3)


class OracleDraft(DraftModel):
    """Proposes given codes (one-hot logits): the main's own greedy layers, optionally with one
    code changed at `wrong_depth` (1-based) so acceptance must stop right there."""

    def __init__(self, hidden_size: int, k: int):
        super().__init__(DraftConfig(hidden_size=hidden_size, d_model=8, n_heads=1, ffn=8,
                                     head_hidden=8, num_proposals=k))
        self.codes = None               # [L, C] long, set per input
        self.wrong_depth = None

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        proposals = self.codes[1:self.num_proposals + 1].clone()          # [K, C]
        if self.wrong_depth is not None:
            row = proposals[self.wrong_depth - 1]
            row[17] = (row[17] + 1) % self.config.levels
        logits = F.one_hot(proposals, self.config.levels).to(h0.dtype)    # [K, C, V]
        return logits.expand(h0.shape[0], *logits.shape)                  # [B, K, C, V]


def untrained_draft(hidden_size: int, k: int = 6, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    config = DraftConfig(hidden_size=hidden_size, d_model=64, n_heads=2, ffn=128, head_hidden=64,
                         num_proposals=k)
    return DraftModel(config).to(dtype).eval()


def context_sensitive(engine: RSDEngine) -> RSDEngine:
    """A copy of a main-only engine whose main looks back at the cached layers.

    The bundle's randomly initialised main hardly does: its layer-index embedding dominates each
    position and attention is nearly uniform, so the next layer's codes barely depend on the
    layers in the KV cache and a cache bug could go unseen. Sharper (q, k x8), stronger
    (o x30) attention and a smaller layer-index embedding (x0.1) make dozens of codes depend on
    the cached layers (checked by test_test_main_depends_on_the_cached_layers).
    """
    main = copy.deepcopy(engine.main)
    with torch.no_grad():
        main.layer_embedding.layer.weight *= 0.1
        for layer in main.backbone.model.language_model.layers:
            layer.self_attn.o_proj.weight *= 30
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
    return RSDEngine(main, engine.tokenizer, None)


@pytest.fixture(scope='module')
def main_only64(tiny_bundle):
    return context_sensitive(RSDEngine.from_dirs(tiny_bundle, draft_dir='', dtype='float64'))


@pytest.fixture(scope='module')
def distilled_dir(tiny_bundle, tmp_path_factory):
    from rsd_core.training.distill import distill_draft
    from rsd_core.training.draft_training import TrainConfig
    from rsd_core.training.synthetic_observations import write_synthetic_observations

    scratch = tmp_path_factory.mktemp('distill')
    observations = write_synthetic_observations(scratch / 'obs', count=6, seed=1, image_size=64)
    distill_draft(tiny_bundle, observations, scratch / 'draft', num_proposals=3, samples=12,
                  seed=0, progress=False, train=TrainConfig(epochs=2, batch_size=8))
    return scratch / 'draft'


def with_draft(engine: RSDEngine, draft, **config) -> RSDEngine:
    """The engine's main and tokenizer with `draft`; K fixed (the mechanics under test) unless
    `adaptive` is given."""
    config.setdefault('adaptive', False)
    return RSDEngine(engine.main, engine.tokenizer, draft, EngineConfig(**config))


def prepared(main, image, instruction) -> dict:
    return {k: v.to(main.device) for k, v in main.processor([image], [instruction]).items()}


@torch.inference_mode()
def reference_greedy(main, image, instruction) -> torch.Tensor:
    """Main-only greedy codes [L, C], recomputing prompt + all layers so far for each layer."""
    inputs = prepared(main, image, instruction)
    _, _, logits0 = main.prefill(inputs)
    codes = logits0.argmax(-1)[:, None]                                    # [1, 1, C]
    while codes.shape[1] < main.num_layers:
        cache, _, _ = main.prefill(inputs)
        logits, _ = main.forward_layers(cache, codes, first_layer=0)      # [1, l, C, V]
        codes = torch.cat([codes, logits[:, -1:].argmax(-1)], dim=1)
    return codes[0].cpu()


@torch.inference_mode()
def tolerance_chain(engine, draft, image, instruction):
    """For depth d = 1..K: the draft's layer, the main's layer after [layer 0, proposals < d]
    (single-position steps), and the per-dimension deviation of decoding one instead of the
    other, [A] action units (max over chunk steps)."""
    main = engine.main
    cache, h0, logits0 = main.prefill(prepared(main, image, instruction))
    prefix = logits0.argmax(-1)[:, None]                                   # [1, 1, C]
    proposals = draft(h0).argmax(-1)                                       # [1, K, C]
    chain = []
    for depth in range(1, proposals.shape[1] + 1):
        logits, _ = main.forward_layers(cache, prefix[:, -1:], first_layer=depth - 1)
        main_layer = logits[:, 0].argmax(-1)                               # [1, C]
        decoded = [engine.tokenizer.decode(codes_to_tokens(torch.cat([prefix, layer[:, None]], 1)))
                   for layer in (proposals[:, depth - 1], main_layer)]     # [1, T, A] each
        deviation = (decoded[0] - decoded[1]).abs()[0].amax(0).double()    # [A]
        chain.append((proposals[:, depth - 1], main_layer, deviation))
        prefix = torch.cat([prefix, proposals[:, depth - 1:depth]], dim=1)
    return chain


@contextmanager
def counting_passes(main):
    """Count language-model forwards (prefill, verification and each step run it once)."""
    calls = [0]
    handle = main.backbone.model.language_model.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def check_consistent(stats, num_layers: int = 8) -> None:
    assert 0 <= stats.layers_accepted <= stats.layers_proposed
    assert stats.accepted_by_depth == [d < stats.layers_accepted
                                       for d in range(stats.layers_proposed)]
    if stats.used_draft:
        assert stats.main_passes == num_layers - stats.layers_accepted
        assert stats.verify_ms > 0 and stats.draft_ms > 0
    else:
        assert (stats.main_passes, stats.layers_proposed, stats.acceptance) == (8, 0, 'none')
    assert stats.total_ms >= stats.prefill_ms + stats.step_ms + stats.verify_ms


# ---------------------------------------------------------------- main-only

@torch.inference_mode()
def test_test_main_depends_on_the_cached_layers(main_only64):
    main = main_only64.main
    image, instruction = INPUTS[0]
    codes = main_only64.decode_tokens(image, instruction)[0][None]         # [1, L, C]
    inputs = prepared(main, image, instruction)
    cache, _, _ = main.prefill(inputs)
    full, _ = main.forward_layers(cache, codes[:, :7], first_layer=0)     # [1, 7, C, V]
    cache, _, _ = main.prefill(inputs)
    main.forward_layers(cache, codes[:, :3], first_layer=0)
    gap, _ = main.forward_layers(cache, codes[:, 4:7], first_layer=4)     # layer 3 missing
    assert int((full[:, -1].argmax(-1) != gap[:, -1].argmax(-1)).sum()) >= 10


def test_main_only_is_greedy_decoding_with_eight_passes(main_only64):
    engine = main_only64
    for image, instruction in INPUTS[:2]:
        codes, actions, stats = engine.decode_tokens(image, instruction)
        assert torch.equal(codes, reference_greedy(engine.main, image, instruction))
        assert stats.main_passes == 8 and stats.near_ties == 0
        check_consistent(stats)
        expected = engine.tokenizer.decode(codes_to_tokens(codes[None]))[0].float().numpy()
        assert actions.dtype == np.float32 and actions.shape == (8, 7)
        np.testing.assert_array_equal(actions, expected)


def test_pass_counter_sees_one_forward_per_main_pass(main_only64):
    engine = with_draft(main_only64, untrained_draft(main_only64.main.hidden_size))
    with counting_passes(engine.main) as calls:
        for use_draft in (False, True):
            before = calls[0]
            _, stats = engine.predict(*INPUTS[0], use_draft=use_draft)
            assert calls[0] - before == stats.main_passes


# ---------------------------------------------------------------- exact mode, float64

@pytest.mark.parametrize('k', [1, 3, 6])
def test_exact_untrained_draft_gives_main_only_tokens(main_only64, k):
    engine = with_draft(main_only64, untrained_draft(main_only64.main.hidden_size, k=6),
                        num_proposals=k)
    for image, instruction in INPUTS:
        reference, ref_actions, _ = main_only64.decode_tokens(image, instruction)
        codes, actions, stats = engine.decode_tokens(image, instruction)
        assert torch.equal(codes, reference)
        np.testing.assert_array_equal(actions, ref_actions)
        assert stats.used_draft and stats.layers_proposed == k and stats.near_ties == 0
        check_consistent(stats)


@pytest.mark.parametrize('k', range(1, 7))
def test_oracle_draft_is_accepted_on_every_layer(main_only64, k):
    oracle = OracleDraft(main_only64.main.hidden_size, k).double()
    engine = with_draft(main_only64, oracle)
    image, instruction = INPUTS[k % len(INPUTS)]
    oracle.codes, ref_actions, _ = main_only64.decode_tokens(image, instruction)
    with counting_passes(engine.main) as calls:
        codes, actions, stats = engine.decode_tokens(image, instruction)
    assert torch.equal(codes, oracle.codes)
    np.testing.assert_array_equal(actions, ref_actions)
    assert stats.layers_accepted == k and all(stats.accepted_by_depth)
    assert stats.main_passes == 1 + 1 + (6 - k) == calls[0]
    check_consistent(stats)


@pytest.mark.parametrize('wrong_depth', range(1, 7))
def test_exact_stops_at_the_first_wrong_layer_and_crops_the_cache(main_only64, wrong_depth):
    # The proposals after the wrong layer are right again: only a correct crop and the free
    # correction give the main-only tokens afterwards.
    oracle = OracleDraft(main_only64.main.hidden_size, 6).double()
    oracle.wrong_depth = wrong_depth
    engine = with_draft(main_only64, oracle)
    image, instruction = INPUTS[wrong_depth % len(INPUTS)]
    oracle.codes, ref_actions, _ = main_only64.decode_tokens(image, instruction)
    codes, actions, stats = engine.decode_tokens(image, instruction)
    assert torch.equal(codes, oracle.codes)
    np.testing.assert_array_equal(actions, ref_actions)
    assert stats.layers_accepted == wrong_depth - 1
    assert stats.main_passes == 8 - (wrong_depth - 1)
    check_consistent(stats)


def test_exact_distilled_draft_gives_main_only_tokens(tiny_bundle, distilled_dir):
    # The bundle's own main (the draft was distilled from it), loaded with from_dirs.
    engine = RSDEngine.from_dirs(tiny_bundle, distilled_dir, dtype='float64', adaptive=False)
    assert engine.draft.num_proposals == 3 and engine.config.use_draft
    aggregator = StatsAggregator()
    for image, instruction in random_inputs(3, seed=7):
        reference, ref_actions, _ = engine.decode_tokens(image, instruction, use_draft=False)
        codes, actions, stats = engine.decode_tokens(image, instruction)
        assert torch.equal(codes, reference)
        np.testing.assert_array_equal(actions, ref_actions)
        check_consistent(stats)
        aggregator.add(stats)
    summary = aggregator.summary()
    assert sum(summary['accepted_length_hist']) == 3
    assert summary['layers_accepted'] <= summary['layers_proposed'] == 9
    assert summary['main_passes_total'] == 3 * 8 - summary['layers_accepted']


# ---------------------------------------------------------------- tolerance mode

def expected_verdict(chain, tolerance: np.ndarray) -> tuple[int, float]:
    accepted, worst = 0, 0.0
    for _, _, deviation in chain:
        if not (deviation.numpy() <= tolerance).all():
            break
        accepted, worst = accepted + 1, max(worst, float(deviation.max()))
    return accepted, worst


def test_tolerance_bound_holds_and_reported_deviation_is_recomputed(main_only64):
    hidden = main_only64.main.hidden_size
    oracle = OracleDraft(hidden, 6).double()
    oracle.wrong_depth = 3                    # exact on layers 1-2, one code off on layer 3
    seen = set()
    for draft in (untrained_draft(hidden, k=6, seed=3), oracle):
        engine = with_draft(main_only64, draft, acceptance='tolerance')
        for image, instruction in INPUTS[:2]:
            oracle.codes = main_only64.decode_tokens(image, instruction)[0]
            chain = tolerance_chain(main_only64, draft, image, instruction)
            deviations = np.stack([d.numpy() for _, _, d in chain])        # [K, A]
            # Tolerances between recomputed deviations (never on a boundary): 0, above the
            # smallest, below the largest, above all.
            levels = np.unique(deviations.max(1))
            middle = {(levels[i] + levels[i + 1]) / 2 for i in {0, len(levels) - 2}
                      if len(levels) > 1}
            for cut in [0.0, *sorted(middle), levels[-1] * 2 + 1.0]:
                tolerance = np.full(7, cut)
                engine.update_config(tolerance=tolerance.tolist())
                codes, actions, stats = engine.decode_tokens(image, instruction)
                accepted, worst = expected_verdict(chain, tolerance)
                seen.add(accepted)
                assert stats.layers_accepted == accepted
                # float32 decoding of O(1) actions: a few ulp apart from the recomputation
                assert stats.max_deviation == pytest.approx(worst, rel=1e-5, abs=1e-6)
                assert (deviations[:accepted] <= tolerance).all()
                kept = [proposal for proposal, _, _ in chain[:accepted]]
                if kept:
                    assert torch.equal(codes[1:1 + accepted], torch.cat(kept))
                if accepted < len(chain):          # the main's own layer after the prefix
                    assert torch.equal(codes[1 + accepted], chain[accepted][1][0])
                check_consistent(stats)
    assert {0, 2, 6} <= seen


def test_tolerance_is_per_dimension(main_only64):
    draft = untrained_draft(main_only64.main.hidden_size, k=2, seed=3)
    engine = with_draft(main_only64, draft, acceptance='tolerance')
    image, instruction = INPUTS[0]
    chain = tolerance_chain(main_only64, draft, image, instruction)
    deviation = chain[0][2].numpy()                                          # [A]
    assert deviation.max() > 0
    loose = deviation * 1.01 + 1e-6
    engine.update_config(tolerance=loose.tolist())
    assert engine.predict(image, instruction)[1].layers_accepted >= 1
    tight = loose.copy()
    worst = int(deviation.argmax())
    tight[worst] = deviation[worst] * 0.99
    engine.update_config(tolerance=tight.tolist())
    assert engine.predict(image, instruction)[1].layers_accepted == 0


def test_tolerance_zero_equals_exact_when_the_draft_is_exact(main_only64):
    oracle = OracleDraft(main_only64.main.hidden_size, 4).double()
    engine = with_draft(main_only64, oracle, acceptance='tolerance', tolerance=0.0)
    image, instruction = INPUTS[1]
    oracle.codes, ref_actions, _ = main_only64.decode_tokens(image, instruction)
    actions, stats = engine.predict(image, instruction)
    np.testing.assert_array_equal(actions, ref_actions)
    assert (stats.layers_accepted, stats.max_deviation, stats.acceptance) == (4, 0.0,
                                                                              'tolerance')


# ---------------------------------------------------------------- float32: near ties

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_low_precision_exact_is_identical_unless_a_near_tie_is_reported(tiny_bundle,
                                                                         distilled_dir, dtype):
    main_only = context_sensitive(RSDEngine.from_dirs(tiny_bundle, draft_dir='', dtype=dtype))
    hidden, torch_dtype = main_only.main.hidden_size, getattr(torch, dtype)
    oracle = OracleDraft(hidden, 6).to(torch_dtype)
    distilled = RSDEngine.from_dirs(tiny_bundle, distilled_dir, dtype=dtype)
    engines = [with_draft(main_only, untrained_draft(hidden, dtype=torch_dtype)),
               with_draft(main_only, oracle), distilled]
    near_ties = 0
    for image, instruction in random_inputs(3, seed=11):
        oracle.codes = main_only.decode_tokens(image, instruction)[0]
        for engine in engines:
            reference = engine.decode_tokens(image, instruction, use_draft=False)[0]
            codes, _, stats = engine.decode_tokens(image, instruction)
            check_consistent(stats)
            near_ties += stats.near_ties
            if stats.near_ties == 0:
                assert torch.equal(codes, reference)
    if dtype == 'bfloat16':             # ~100 per chunk: the test meets both branches
        assert near_ties > 0


# ---------------------------------------------------------------- switches, inputs, errors

def test_runtime_switches_are_validated(main_only64):
    engine = with_draft(main_only64, untrained_draft(main_only64.main.hidden_size, k=3))
    assert engine.config.use_draft and engine.config.num_proposals is None
    with pytest.raises(ValueError, match='acceptance must be one of'):
        engine.update_config(acceptance='fuzzy')
    with pytest.raises(ValueError, match='exceeds the draft K = 3'):
        engine.update_config(num_proposals=4)
    with pytest.raises(ValueError, match='finite and >= 0'):
        engine.update_config(tolerance=-0.1)
    with pytest.raises(ValueError, match='finite and >= 0'):
        engine.update_config(tolerance=[0.1] * 6 + [float('nan')])
    with pytest.raises(ValueError, match='numbers in action units'):
        engine.update_config(tolerance='small')
    with pytest.raises(ValueError, match='one per action dim'):
        engine.update_config(tolerance=[0.1, 0.2])
    with pytest.raises(ValueError, match='no draft'):
        main_only64.update_config(use_draft=True)
    with pytest.raises(ValueError, match='no draft'):
        main_only64.predict(*INPUTS[0], use_draft=True)
    assert engine.update_config(tolerance=(0.1,) * 7, num_proposals=2).num_proposals == 2
    _, stats = engine.predict(*INPUTS[0], use_draft=False)
    assert not stats.used_draft and engine.config.use_draft
    assert engine.predict(*INPUTS[0])[1].layers_proposed == 2


def test_config_changes_from_another_thread_apply_per_call(main_only64):
    engine = with_draft(main_only64, untrained_draft(main_only64.main.hidden_size, k=3))
    stop = threading.Event()

    def toggle() -> None:
        i = 0
        while not stop.is_set():
            engine.update_config(use_draft=bool(i % 2),
                                 acceptance=('exact', 'tolerance')[i // 2 % 2])
            i += 1
            time.sleep(0.001)

    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        results = [engine.predict(*INPUTS[i % 3])[1] for i in range(6)]
    finally:
        stop.set()
        thread.join()
    for stats in results:
        check_consistent(stats)
        assert stats.acceptance in (('exact', 'tolerance') if stats.used_draft else ('none',))


@pytest.mark.parametrize('image, instruction, message', [
    (np.zeros((32, 32), np.uint8), 'open the drawer', r'\[H, W, 3\]'),
    (np.zeros((32, 32, 3), np.float32), 'open the drawer', 'uint8'),
    ('not an image', 'open the drawer', 'numpy array'),
    (np.zeros((32, 32, 3), np.uint8), '  ', 'non-empty string'),
    (np.zeros((32, 32, 3), np.uint8), None, 'non-empty string'),
])
def test_bad_inputs_raise_clear_errors(main_only64, image, instruction, message):
    with pytest.raises(ValueError, match=message):
        main_only64.predict(image, instruction)


def test_non_finite_logits_raise_instead_of_decoding(main_only64):
    broken = copy.deepcopy(main_only64.main)
    with torch.no_grad():
        broken.rfsq_head.proj.bias[3] = float('nan')
    engine = RSDEngine(broken, main_only64.tokenizer, None)
    with pytest.raises(NonFiniteLogitsError, match='main prefill'):
        engine.predict(*INPUTS[0])
    draft = untrained_draft(main_only64.main.hidden_size, k=2)
    with torch.no_grad():
        draft.input_proj.weight[0, 0] = float('inf')
    engine = with_draft(main_only64, draft)
    with pytest.raises(NonFiniteLogitsError, match='draft'):
        engine.predict(*INPUTS[0])


@pytest.mark.parametrize('draft_dir', [None, 'default'])
def test_from_dirs_without_a_bundle_draft_runs_main_only(tiny_bundle, draft_dir):
    engine = RSDEngine.from_dirs(tiny_bundle, draft_dir, tolerance=0.1)
    assert engine.draft is None and not engine.config.use_draft
    assert engine.config.tolerance == 0.1
    actions, stats = engine.predict(*INPUTS[0])
    assert actions.shape == (8, 7) and stats.main_passes == 8 and not stats.used_draft


def test_draft_must_match_the_main_model(main_only64):
    with pytest.raises(ValueError, match='does not match the main model'):
        with_draft(main_only64, untrained_draft(main_only64.main.hidden_size + 8))


# ---------------------------------------------------------------- rsd bench

def test_bench_reports_speedup_identity_and_deviation(tiny_bundle, distilled_dir, tmp_path,
                                                      capsys):
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    plot = tmp_path / 'latency.png'
    args = parser.parse_args(['--model', str(tiny_bundle), '--draft', str(distilled_dir),
                              '--dtype', 'float64', '-n', '2', '--warmup', '1', '--json',
                              '--plot', str(plot), '--tolerance', '0.05'])
    assert bench.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['identical_actions'] == result['identical_actions_of'] == 4  # 2 exact modes
    assert result['identical_actions_all']
    assert set(result['speedup_p50']) == {'exact', 'exact_fixed', 'tolerance', 'bounded'}
    bounded = result['bounded']
    assert bounded['max_deviation_vs_main_only'] <= bounded['certified_bound_max'] <= 0.05
    assert bounded['deviation_within_certificate'] and 1 <= bounded['mean_layers_decoded'] <= 8
    assert 0 < result['physical_limit']['prefill_only_over_main_only'] < 1
    layers = result['layers']
    assert [row['layer'] for row in layers] == list(range(8))
    assert all(r['truncation_change_max'] <= r['certified_bound_max'] + 1e-12
               and r['witness_max'] <= r['certified_bound_max'] + 1e-12 for r in layers[1:])
    assert [r['draft_code_agreement'] is not None for r in layers] == [False] * 1 + [True] * 3 \
        + [False] * 4
    assert result['modes']['main_only']['main_passes']['mean'] == 8
    exact = result['modes']['exact_fixed']
    assert exact['main_passes']['mean'] == 8 - exact['mean_accepted_layers']
    assert len(exact['acceptance_by_depth']) == 3
    assert result['speedup_p50']['exact'] > 0 and result['speedup_paired_median']['exact'] > 0
    assert np.isfinite(result['tolerance_max_deviation'])
    assert plot.stat().st_size > 0
    args.json, args.plot = False, ''
    assert bench.run(args) == 0
    assert 'speedup' in capsys.readouterr().out
