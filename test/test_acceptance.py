"""Acceptance rules and near-tie accounting on hand-built tensors."""

import pytest
import torch

from rsd_core.acceptance import (
    accept_exact,
    accept_tolerance,
    layer_deviation,
    near_tie_threshold,
    near_ties,
)

C, T, A = 128, 8, 7


def decode(codes: torch.Tensor) -> torch.Tensor:
    """A nonlinear residual decoder: codes [B, l, C] -> actions [B, T, A].

    Layer l contributes (code - 3) * 0.5**l to a latent; the first T*A latent values pass a
    tanh. Codes past T*A do not reach any action.
    """
    scale = 0.5 ** torch.arange(codes.shape[1], dtype=torch.float64)
    latent = ((codes.double() - 3) * scale[:, None]).sum(dim=1)      # [B, C]
    return torch.tanh(latent[:, :T * A]).reshape(-1, T, A)


def random_codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 7, shape, generator=torch.Generator().manual_seed(seed))


def test_exact_accepts_longest_matching_prefix():
    main = random_codes(1, 4, C)
    assert accept_exact(main.clone(), main).accepted == 4
    proposals = main.clone()
    proposals[0, 1, 5] = (main[0, 1, 5] + 1) % 7          # depth 2 differs in one code
    proposals[0, 3] = (main[0, 3] + 1) % 7                # depth 4 differs, after the break
    verdict = accept_exact(proposals, main)
    assert (verdict.accepted, verdict.passed) == (1, [True, False, False, False])
    assert verdict.max_deviation == 0.0
    proposals[0, 0, 0] = (main[0, 0, 0] + 1) % 7
    assert accept_exact(proposals, main).accepted == 0


def test_exact_requires_every_batch_element():
    main = random_codes(2, 2, C)
    proposals = main.clone()
    proposals[1, 0, 7] = (main[1, 0, 7] + 3) % 7
    assert accept_exact(proposals, main).passed == [False, False]


def test_near_ties_counts_codes_below_the_dtype_threshold():
    logits = torch.zeros(2, 3, 7, dtype=torch.float64)
    logits[..., 0] = 10.0
    logits[0, 0, 1] = 10.0 - 1e-12       # gap 1e-12 < 1e-10 * 10: a near tie in float64
    logits[0, 1, 1] = 10.0 - 1e-6        # not in float64, is in float32 (1e-5 * 10)
    logits[1, 2, 1] = 10.0               # exact tie
    assert near_ties(logits) == 2
    assert near_ties(logits.float()) == 3
    assert near_ties(torch.eye(7)[None]) == 0


def test_near_tie_thresholds_grow_as_precision_drops():
    thresholds = [near_tie_threshold(d) for d in (torch.float64, torch.float32, torch.float16,
                                                  torch.bfloat16)]
    assert thresholds == sorted(thresholds)
    assert thresholds[1] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match='near-tie threshold'):
        near_tie_threshold(torch.int64)


def test_tolerance_accepts_changes_that_do_not_reach_actions():
    prefix, main = random_codes(1, 1, C, seed=1), random_codes(1, 3, C, seed=2)
    proposals = main.clone()
    proposals[0, :, T * A:] = (main[0, :, T * A:] + 2) % 7    # unused latent values only
    verdict = accept_tolerance(decode, prefix, proposals, main, torch.full((A,), 1e-9))
    assert (verdict.accepted, verdict.max_deviation) == (3, 0.0)
    assert accept_exact(proposals, main).accepted == 0


def test_tolerance_is_per_dimension_and_reports_the_accepted_deviation():
    prefix = torch.full((1, 1, C), 3)
    main = torch.full((1, 3, C), 3)
    proposals = main.clone()
    proposals[0, 0, 2] = 4                 # depth 1 moves step 0, dim 2: tanh(0.5)
    proposals[0, 1, 7 + 5] = 5             # depth 2 moves step 1, dim 5: tanh(0.5)
    proposals[0, 2, 0] = 6                 # depth 3 moves step 0, dim 0: tanh(0.375)
    step = float(torch.tanh(torch.tensor(0.5, dtype=torch.float64)))
    tolerance = torch.full((A,), 0.4, dtype=torch.float64)
    tolerance[2] = 0.5
    verdict = accept_tolerance(decode, prefix, proposals, main, tolerance)
    assert (verdict.accepted, verdict.passed) == (1, [True, False, False])
    assert verdict.max_deviation == pytest.approx(step)
    tolerance[5] = 0.5
    verdict = accept_tolerance(decode, prefix, proposals, main, tolerance)
    assert verdict.accepted == 3
    assert verdict.max_deviation == pytest.approx(step)


def test_tolerance_compares_after_the_accepted_draft_prefix():
    # With a nonlinear decoder the deviation at depth 2 depends on which layer 1 was kept.
    prefix, main = random_codes(1, 1, C, seed=3), random_codes(1, 2, C, seed=4)
    proposals = random_codes(1, 2, C, seed=5)
    verdict = accept_tolerance(decode, prefix, proposals, main, torch.full((A,), 10.0))
    assert verdict.accepted == 2
    depth1 = layer_deviation(decode, prefix, proposals[:, 0], main[:, 0])
    depth2 = layer_deviation(decode, torch.cat([prefix, proposals[:, :1]], 1), proposals[:, 1],
                             main[:, 1])
    assert verdict.max_deviation == pytest.approx(float(max(depth1.max(), depth2.max())))
    wrong = layer_deviation(decode, torch.cat([prefix, main[:, :1]], 1), proposals[:, 1],
                            main[:, 1])
    assert not torch.allclose(wrong, depth2)


def test_tolerance_decision_depends_on_the_kept_draft_layer():
    # Code 0 only: layer 1 draft 4 vs main 3 moves the latent by 0.5 (|change| tanh(0.5) = 0.46);
    # layer 2 draft 6 vs main 3 adds 0.75 on top of the kept layer 1: after the DRAFT's layer 1
    # the change is tanh(1.25) - tanh(0.5) = 0.39, after the main's it would be tanh(0.75) = 0.64.
    prefix = torch.full((1, 1, C), 3)
    main = torch.full((1, 2, C), 3)
    proposals = main.clone()
    proposals[0, 0, 0], proposals[0, 1, 0] = 4, 6
    verdict = accept_tolerance(decode, prefix, proposals, main, torch.full((A,), 0.5))
    assert verdict.accepted == 2
    expected = torch.tanh(torch.tensor(0.5, dtype=torch.float64))
    assert verdict.max_deviation == pytest.approx(float(expected))
