"""Several arms in one batch (`RSDEngine.predict_batch`, `rsd bench --batch`), on real tiny
LLaVA bundles in float64: prompts of different lengths are left-padded and masked, so every row
sees exactly what it would alone (hidden states to 1e-10), and each mode's guarantee holds per
row. The references are single-input runs of the same model."""

import json

import numpy as np
import pytest
import torch

from rsd_core import bench
from rsd_core.batch_bench import batch_sizes
from rsd_core.draft import DraftConfig, DraftModel
from rsd_core.engine import EngineConfig, RSDEngine
from rsd_core.main_model import MainModel

INSTRUCTIONS = ('pick up the black bowl next to the ramekin and place it on the plate',
                'turn on the stove', 'open the middle drawer of the cabinet',
                'put the bowl on the plate')


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 16 * i, 64, 3), dtype=np.uint8) for i in range(n)]


def states(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).normal(0, 1, (n, 3)).astype(np.float32))


@pytest.fixture(scope='module')
def engine64(tiny_bundle):
    return RSDEngine.from_dirs(tiny_bundle, draft_dir='', dtype='float64')


def inputs(main: MainModel, pictures, instructions, proprios=None, pad=True) -> dict:
    batch = main.processor(list(pictures), list(instructions), pad=pad)
    if proprios is not None:
        batch['proprio'] = torch.as_tensor(np.stack(proprios))
    return batch


@pytest.mark.parametrize('bundle', ['tiny_bundle', 'proprio_bundle'])
def test_a_padded_row_sees_exactly_what_it_sees_alone(bundle, request):
    check_rows_alone(MainModel.from_dir(request.getfixturevalue(bundle), dtype=torch.float64))


@torch.inference_mode()
def check_rows_alone(main: MainModel) -> None:
    """Prefill, a two-layer step, a crop and a step again: each row of a padded batch of three
    against the same row alone."""
    pictures, proprios = images(3), states(3) if main.proprio_names else None
    batch = inputs(main, pictures, INSTRUCTIONS[:3], proprios)
    assert batch['attention_mask'].min() == 0                     # the batch is really padded
    cache, h0, logits0 = main.prefill(batch)
    codes = logits0.argmax(-1)[:, None]                           # [3, 1, C]
    logits, hidden = main.forward_layers(cache, torch.cat([codes, codes], 1), first_layer=0)
    main.crop(cache, main.cache_length(cache) - 1)                # as after a rejection
    after_crop, _ = main.forward_layers(cache, codes, first_layer=1)
    for row in range(3):
        alone = inputs(main, pictures[row:row + 1], INSTRUCTIONS[row:row + 1],
                       None if proprios is None else proprios[row:row + 1], pad=False)
        cache1, h1, logits1 = main.prefill(alone)
        torch.testing.assert_close(h0[row], h1[0], rtol=0, atol=1e-10)
        step, hidden1 = main.forward_layers(cache1, torch.cat([codes, codes], 1)[row:row + 1],
                                            first_layer=0)
        torch.testing.assert_close(hidden[row], hidden1[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(logits[row], step[0], rtol=0, atol=1e-10)
        main.crop(cache1, main.cache_length(cache1) - 1)
        again, _ = main.forward_layers(cache1, codes[row:row + 1], first_layer=1)
        torch.testing.assert_close(after_crop[row], again[0], rtol=0, atol=1e-10)
    assert not torch.allclose(h0[0], h0[1])                       # the rows really differ


def test_main_only_batch_gives_every_row_its_own_chunk(engine64):
    pictures = images(4)
    actions, stats = engine64.predict_batch(pictures, list(INSTRUCTIONS), use_draft=False)
    assert actions.shape == (4, *engine64.predict(pictures[0], INSTRUCTIONS[0])[0].shape)
    assert stats.main_passes == 8 and stats.layers_decoded == 8
    for row in range(4):
        alone, _ = engine64.predict(pictures[row], INSTRUCTIONS[row], use_draft=False)
        np.testing.assert_allclose(actions[row], alone, rtol=0, atol=1e-6)
    assert not np.allclose(actions[0], actions[1])


def test_exact_speculation_in_a_batch_keeps_each_rows_greedy_chunk(engine64):
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig(hidden_size=engine64.main.hidden_size, d_model=32, n_heads=2,
                                   ffn=64, head_hidden=32, num_proposals=3)).double().eval()
    speculative = RSDEngine(engine64.main, engine64.tokenizer, draft,
                            EngineConfig(adaptive=False))
    pictures = images(4, seed=1)
    actions, stats = speculative.predict_batch(pictures, list(INSTRUCTIONS))
    assert stats.used_draft and stats.layers_proposed == 3
    main_only, _ = engine64.predict_batch(pictures, list(INSTRUCTIONS), use_draft=False)
    np.testing.assert_array_equal(actions, main_only)


def test_bounded_batch_is_certified_for_every_row(engine64):
    bounded = RSDEngine(engine64.main, engine64.tokenizer, None,
                        EngineConfig(acceptance='bounded', tolerance=0.3))
    pictures = images(3, seed=2)
    actions, stats = bounded.predict_batch(pictures, list(INSTRUCTIONS[:3]))
    main_only, _ = engine64.predict_batch(pictures, list(INSTRUCTIONS[:3]), use_draft=False)
    assert stats.certified_bound is not None and stats.certified_bound <= 0.3
    assert np.abs(actions - main_only).max() <= stats.certified_bound + 1e-9


def test_a_batch_of_a_state_model_needs_one_state_per_arm(proprio_bundle):
    engine = RSDEngine.from_dirs(proprio_bundle, draft_dir='', dtype='float64')
    pictures, proprios = images(2), states(2)
    actions, _ = engine.predict_batch(pictures, list(INSTRUCTIONS[:2]), proprios)
    for row in range(2):
        alone, _ = engine.predict(pictures[row], INSTRUCTIONS[row], proprio=proprios[row])
        np.testing.assert_allclose(actions[row], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='one proprio'):
        engine.predict_batch(pictures, list(INSTRUCTIONS[:2]))
    with pytest.raises(ValueError, match='NaN'):
        engine.predict_batch(pictures, list(INSTRUCTIONS[:2]),
                             [proprios[0], np.full(3, np.nan, np.float32)])


@pytest.mark.parametrize('pictures, instructions, message', [
    ([], [], 'non-empty'),
    (images(2), list(INSTRUCTIONS[:1]), 'equal'),
    (images(2), ['turn on the stove', '   '], 'empty'),
])
def test_bad_batches_are_refused_clearly(engine64, pictures, instructions, message):
    with pytest.raises(ValueError, match=message):
        engine64.predict_batch(pictures, instructions)


def test_batch_sizes_are_one_and_the_powers_of_two_up_to_n():
    assert batch_sizes(1) == [1] and batch_sizes(4) == [1, 2, 4]
    assert batch_sizes(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match='>= 1'):
        batch_sizes(0)


def test_bench_batch_reports_each_size(tiny_bundle, tmp_path, capsys):
    from rsd_core.training.distill import distill_draft
    from rsd_core.training.draft_training import TrainConfig
    from rsd_core.training.synthetic_observations import write_synthetic_observations

    observations = write_synthetic_observations(tmp_path / 'obs', count=4, seed=1, image_size=64)
    distill_draft(tiny_bundle, observations, tmp_path / 'draft', num_proposals=2, samples=4,
                  seed=0, progress=False, train=TrainConfig(epochs=1, batch_size=4))
    parser = bench.argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(['--model', str(tiny_bundle), '--draft', str(tmp_path / 'draft'),
                              '-n', '3', '--warmup', '1', '--batch', '4', '--json', '--plot', ''])
    assert bench.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['batch_mode'] == 'main_only' and set(result['batch']) == {'1', '2', '4'}
    for size, row in result['batch'].items():
        assert row['chunks'] == int(size) * 3
        assert row['chunks_per_s'] > 0 and row['latency_p90_ms'] >= row['latency_p50_ms'] > 0
        assert row['max_abs_diff_vs_batch1'] < 1e-4
    assert result['batch']['1']['speedup_vs_1'] == pytest.approx(1.0)
    args.json = False
    assert bench.run(args) == 0
    assert 'chunks/s' in capsys.readouterr().out


def test_all_accepted_rounds_follow_the_engine():
    from rsd_core.bench import all_accepted_rounds

    assert all_accepted_rounds(8, 3, rolls=False) == (1, 3)     # v1: P + D + v + (L-2-K) d
    assert all_accepted_rounds(8, 3, rolls=True) == (2, 0)      # 1 + 4 + 3 decided, no step
    assert all_accepted_rounds(8, 6, rolls=False) == (1, 0)
