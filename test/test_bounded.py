"""Bounded mode (certified depth) and the speculation planner, on the real tiny LLaVA bundle.

Bounded mode must stay within its certificate of main-only decoding on every input, stop at
the shallowest certified depth (never earlier, never later), equal main-only at tolerance 0,
and not depend on whether a draft is used. The planner must bet nothing on a draft that is
never accepted and everything on one that always is.
"""

import numpy as np
import pytest
from test_engine import OracleDraft, random_inputs, untrained_draft
import torch

from rsd_core.engine import EngineConfig, RSDEngine
from rsd_core.speculation import SpeculationPlanner
from rsd_core.tokenizer import codes_to_tokens

INPUTS = random_inputs(6, seed=4)


@pytest.fixture(scope='module')
def main_only64(tiny_bundle):
    return RSDEngine.from_dirs(tiny_bundle, draft_dir='', dtype='float64')


def engine_with(base: RSDEngine, draft=None, **config) -> RSDEngine:
    return RSDEngine(base.main, base.tokenizer, draft,
                     EngineConfig(use_draft=draft is not None, **config))


def certified_depth(engine: RSDEngine, codes: torch.Tensor, tolerance: float) -> int:
    """The shallowest m whose certificate (plus the float32 cast slack) is within tolerance,
    computed from the tokenizer directly."""
    tokens = codes_to_tokens(codes[None], engine.tokenizer.config.latent_dim)
    for depth in range(1, 9):
        bound = engine.tokenizer.truncation_bound(tokens, depth)
        slack = 2.0 ** -23 * (engine.tokenizer.decode(tokens, depth).abs() + bound) + 1e-12
        if depth == 8 or bool((bound + slack <= tolerance).all()):
            return depth
    raise AssertionError('unreachable')


@pytest.mark.parametrize('tolerance', [0.5, 0.05, 0.005])
def test_bounded_stays_within_its_certificate_of_main_only(main_only64, tolerance):
    bounded = engine_with(main_only64, acceptance='bounded', tolerance=tolerance)
    depths = []
    for image, instruction in INPUTS:
        codes, reference, _ = main_only64.decode_tokens(image, instruction)
        got_codes, actions, stats = bounded.decode_tokens(image, instruction)
        depth = stats.layers_decoded
        depths.append(depth)
        assert torch.equal(got_codes, codes[:depth])
        assert depth == certified_depth(main_only64, codes, tolerance)
        assert stats.main_passes == depth and stats.acceptance == 'bounded'
        deviation = np.abs(actions - reference)
        assert deviation.max() <= stats.certified_bound <= tolerance
    assert min(depths) < 8                    # the tolerances above do let it stop early


def test_bounded_at_zero_tolerance_is_main_only(main_only64):
    bounded = engine_with(main_only64, acceptance='bounded', tolerance=0.0)
    for image, instruction in INPUTS[:3]:
        _, reference, _ = main_only64.decode_tokens(image, instruction)
        actions, stats = bounded.predict(image, instruction)
        assert stats.layers_decoded == 8 and stats.certified_bound == 0.0
        np.testing.assert_array_equal(actions, reference)


def test_bounded_per_dimension_tolerance(main_only64):
    loose = [0.5] * 7
    tight = [0.5] * 6 + [0.0]                 # the gripper must match main-only exactly
    for tolerance in (loose, tight):
        bounded = engine_with(main_only64, acceptance='bounded', tolerance=tolerance)
        for image, instruction in INPUTS[:3]:
            _, reference, _ = main_only64.decode_tokens(image, instruction)
            actions, stats = bounded.predict(image, instruction)
            assert np.all(np.abs(actions - reference) <= np.asarray(tolerance))
            if tolerance is tight:
                assert stats.layers_decoded == 8


def test_bounded_result_does_not_depend_on_the_draft(main_only64):
    hidden = main_only64.main.hidden_size
    oracle = OracleDraft(hidden, 3).double()
    plain = engine_with(main_only64, acceptance='bounded', tolerance=0.005)
    for draft in (oracle, untrained_draft(hidden, k=3)):
        speculative = engine_with(main_only64, draft, acceptance='bounded', tolerance=0.005,
                                  adaptive=False)
        previous = None
        for image, instruction in INPUTS[:3]:
            oracle.codes = main_only64.decode_tokens(image, instruction)[0]
            expected, _ = plain.predict(image, instruction)
            actions, stats = speculative.predict(image, instruction)
            np.testing.assert_array_equal(actions, expected)
            if previous is not None:      # proposals only cover the depth the last chunk needed
                assert stats.layers_proposed <= max(0, previous.layers_decoded - 2)
            previous = stats


def test_exact_with_the_planner_stays_identical_to_main_only(main_only64):
    engine = engine_with(main_only64, untrained_draft(main_only64.main.hidden_size, k=3))
    for image, instruction in INPUTS * 2:
        _, reference, _ = main_only64.decode_tokens(image, instruction)
        actions, _ = engine.predict(image, instruction)
        np.testing.assert_array_equal(actions, reference)


def test_planner_stops_betting_on_a_draft_that_is_never_accepted(main_only64):
    engine = engine_with(main_only64, untrained_draft(main_only64.main.hidden_size, k=3))
    chosen = []
    for image, instruction in INPUTS * 3:
        chosen.append(engine.predict(image, instruction)[1].layers_proposed)
    assert chosen[0] == 3                     # nothing known yet: probe
    assert engine.planner.acceptance('exact', 1) <= 0.25
    assert chosen[-8:] == [0] * 8


def test_planner_bets_everything_on_a_draft_the_main_always_accepts(main_only64):
    oracle = OracleDraft(main_only64.main.hidden_size, 3).double()
    engine = engine_with(main_only64, oracle)
    chosen, proposed = [], []
    for image, instruction in INPUTS * 2:
        oracle.codes = main_only64.decode_tokens(image, instruction)[0]
        stats = engine.predict(image, instruction)[1]
        chosen.append(stats.layers_accepted)
        proposed.append(stats.layers_proposed)
    costs = engine.planner.costs
    # The oracle is never wrong; how often the planner bets depends on the measured costs (the
    # first chunk always probes), so the acceptance estimate's confidence does too.
    assert chosen == proposed and proposed[0] > 0
    # Accepting all three saves three steps for one draft pass and three more positions.
    if costs.draft + 3 * costs.per_position < 3 * costs.step * 0.9:
        assert chosen[-4:] == [3] * 4


def test_planner_decisions_from_given_costs():
    planner = SpeculationPlanner(probe_every=5)
    assert planner.choose('exact', 3, 7) == 3                 # nothing measured: probe
    planner.costs.step, planner.costs.draft, planner.costs.per_position = 2.0, 1.0, 0.2
    for _ in range(20):
        planner.record('exact', [(3, 3)], 1.0, 2.6, 3, 6.0)
    assert planner.choose('exact', 3, 7) == 3
    assert planner.choose('exact', 3, 2) == 1                 # only one layer left to verify
    assert planner.choose('exact', 3, 1) == 0
    never = SpeculationPlanner(probe_every=5)
    never.costs.step, never.costs.draft, never.costs.per_position = 2.0, 1.0, 0.2
    for _ in range(32):
        never.record('exact', [(3, 0)], 1.0, 2.6, 6, 12.0)
    picks = [never.choose('exact', 3, 7) for _ in range(10)]
    assert picks.count(3) == 2 and picks.count(0) == 8      # a probe every 5th chunk
    # acceptance rises again: the probes see it and speculation comes back
    for _ in range(32):
        never.record('exact', [(3, 3)], 1.0, 2.6, 3, 6.0)
    assert never.choose('exact', 3, 7) == 3
    assert never.expected_ms('exact', 0, 7) == pytest.approx(7 * never.costs.step)


def test_planner_keeps_acceptance_per_round_start_for_a_rolling_draft():
    """A rolling draft whose first proposal always fails but whose later rounds always pass:
    the bet pays (two cheap rounds finish 7 layers), which a planner that saw only the first
    round would miss."""
    planner = SpeculationPlanner()
    planner.costs.step, planner.costs.draft, planner.costs.per_position = 2.0, 1.0, 0.2
    for _ in range(32):                 # rounds from 1, 2 and 6 layers decided, of 8
        planner.record('exact', [(3, 0), (3, 3), (1, 1)], 3.0, 7.4, 0, 0.0)
    assert planner.acceptance('exact', 1) < 0.05
    assert planner.acceptance('exact', 3, start=2) > 0.95
    assert planner.acceptance('exact', 1, start=3) == planner.acceptance('exact', 1, start=2)
    rolling = planner.expected_ms('exact', 3, 7, rolls=True)
    # 3.6 ms for the failed first round, 3.6 for four layers from 2, 3.2 for the last two
    assert rolling == pytest.approx(3.6 + 3.6 + 3.2, abs=0.2) and rolling < 7 * 2.0
    # k = 2 does better still: three rounds of 3.4 ms (from 1, 2 and 5 layers decided)
    assert planner.expected_ms('exact', 2, 7, rolls=True) == pytest.approx(10.2, abs=0.2)
    assert planner.choose('exact', 3, 7, rolls=True) == 2
    assert planner.expected_ms('exact', 3, 7) > 7 * 2.0      # one round only: it never pays
    assert planner.choose('exact', 3, 7) == 0
