"""Proprioception: a main model that also takes the robot state (real tiny LLaVA, no mocks).

The state enters the prompt as one position after the image tokens; everything downstream
(cache, speculative decoding, exactness, bundles, observation directories) must carry it.
"""

import json
import shutil

from conftest import TEST_JOINTS
import numpy as np
import pytest
import torch

from rsd_core import bench
from rsd_core.checkpoint import CheckpointError, load_tensors, save_component
from rsd_core.engine import EngineConfig, RSDEngine
from rsd_core.main_model import MainModel, heads_proprio_names
from rsd_core.observations import read_observations
from rsd_core.training.synthetic_observations import write_synthetic_observations
from rsd_core.training.teacher_forcing import teacher_forced_logits

INSTRUCTION = 'pick up the black bowl next to the ramekin and place it on the plate'
STATE = np.array([0.3, -1.2, 0.04], np.float32)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def model64(proprio_bundle):
    return MainModel.from_dir(proprio_bundle, dtype=torch.float64)


def inputs(model, images, states):
    batch = model.processor(images, [INSTRUCTION] * len(images))
    return dict(batch, proprio=torch.as_tensor(np.stack(states)))


def test_bundle_declares_and_loads_its_state_inputs(proprio_bundle, tiny_bundle, model64):
    assert heads_proprio_names(proprio_bundle) == TEST_JOINTS
    assert heads_proprio_names(tiny_bundle) == ()
    assert model64.proprio_names == TEST_JOINTS and model64.proprio is not None
    assert {'proprio.mean', 'proprio.std', 'proprio.net.0.weight'} <= set(
        load_tensors(proprio_bundle / 'heads.safetensors'))


def test_state_is_one_prompt_position_and_changes_the_output(model64):
    batch = inputs(model64, [image()], [STATE])
    with torch.inference_mode():
        cache, h0, logits0 = model64.prefill(batch)
        other = model64.prefill(dict(batch, proprio=torch.as_tensor(STATE[None] + 0.5)))
    assert model64.cache_length(cache) == batch['input_ids'].shape[1] + 1
    assert (h0 - other[1]).abs().max() > 1e-6
    assert (logits0 - other[2]).abs().max() > 1e-6


def test_batch_of_two_matches_single_runs(model64):
    states = [STATE, -STATE]
    codes = torch.randint(0, 7, (2, 3, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache, h0, _ = model64.prefill(inputs(model64, [image(1), image(2)], states))
        logits, _ = model64.forward_layers(cache, codes, first_layer=0)
        for row in range(2):
            cache1, h1, _ = model64.prefill(inputs(model64, [image(1 + row)], [states[row]]))
            logits1, _ = model64.forward_layers(cache1, codes[row:row + 1], first_layer=0)
            assert (h0[row] - h1[0]).abs().max() < 1e-9
            assert (logits[row] - logits1[0]).abs().max() < 1e-9


def test_teacher_forcing_is_the_engine_decoding_with_state(model64):
    batch = inputs(model64, [image(3), image(4)], [STATE, STATE * 2])
    codes = torch.randint(0, 7, (2, 8, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = teacher_forced_logits(model64, batch, codes)  # [2, L, C, V]
        cache, _, layer0 = model64.prefill(batch)
        rest, _ = model64.forward_layers(cache, codes[:, :-1], first_layer=0)
    assert torch.allclose(logits, torch.cat([layer0[:, None], rest], 1), atol=1e-10)


@pytest.mark.parametrize('state, message', [
    (None, r'takes proprioception: inputs need proprio \[B, 3\] \(arm_joint1'),
    (torch.zeros(1, 2), r'proprio has shape \[1, 2\]; expected \[1, 3\]'),
    (torch.tensor([[0.0, float('nan'), 0.0]]), 'NaN or Inf'),
])
def test_missing_or_malformed_state_is_refused(model64, state, message):
    batch = model64.processor([image()], [INSTRUCTION])
    if state is not None:
        batch['proprio'] = state
    with pytest.raises(ValueError, match=message):
        model64.prefill(batch)


def test_exact_speculation_with_state_equals_main_only(proprio_bundle):
    from test_engine import untrained_draft

    main_only = RSDEngine.from_dirs(proprio_bundle, draft_dir='', dtype='float64')
    engine = RSDEngine(main_only.main, main_only.tokenizer,
                       untrained_draft(main_only.main.hidden_size, k=3),
                       EngineConfig(acceptance='exact', adaptive=False))
    assert engine.proprio_names == TEST_JOINTS
    for seed in range(3):
        state = STATE * (seed + 1)
        reference, _ = main_only.predict(image(seed), INSTRUCTION, proprio=state)
        actions, stats = engine.predict(image(seed), INSTRUCTION, proprio=state)
        np.testing.assert_array_equal(actions, reference)
        assert stats.used_draft and stats.layers_proposed == 3
    moved, _ = main_only.predict(image(0), INSTRUCTION, proprio=STATE + 1.0)
    assert not np.array_equal(moved, main_only.predict(image(0), INSTRUCTION, proprio=STATE)[0])


@pytest.mark.parametrize('state, message', [
    (None, r'takes proprioception: pass proprio \[3\] \(arm_joint1, arm_joint2, finger_joint'),
    (np.zeros(4), r'proprio has shape \[4\]; expected \[3\]'),
    (np.array([0.0, np.inf, 0.0]), 'NaN or Inf'),
])
def test_engine_refuses_a_missing_or_malformed_state(proprio_bundle, state, message):
    engine = RSDEngine.from_dirs(proprio_bundle, draft_dir='')
    with pytest.raises(ValueError, match=message):
        engine.predict(image(), INSTRUCTION, proprio=state)
    assert engine.predict(image(), INSTRUCTION, proprio=STATE)[0].shape == (8, 7)


def test_models_without_state_ignore_none_and_need_nothing(tiny_bundle):
    engine = RSDEngine.from_dirs(tiny_bundle, draft_dir='')
    assert engine.proprio_names == ()
    assert engine.predict(image(), INSTRUCTION)[0].shape == (8, 7)


def test_heads_manifest_and_tensors_must_agree(proprio_bundle, tmp_path):
    bundle = shutil.copytree(proprio_bundle, tmp_path / 'bundle')
    manifest = json.loads((bundle / 'heads.json').read_text())
    tensors = load_tensors(bundle / 'heads.safetensors')
    save_component(bundle, 'heads', tensors, dict(manifest, proprio_names=[]))
    with pytest.raises(CheckpointError, match='proprio'):
        MainModel.from_dir(bundle)
    save_component(bundle, 'heads', tensors, dict(manifest, proprio_names=['a', 'a', 'b']))
    with pytest.raises(CheckpointError, match='proprio_names must be a list of distinct names'):
        MainModel.from_dir(bundle)
    save_component(bundle, 'heads', tensors, dict(manifest, proprio_names=['a', 'b']))
    with pytest.raises(CheckpointError, match=r'proprio.net.0.weight: shape \[\d+, 3\], '
                                              r'expected \[\d+, 2\]'):
        MainModel.from_dir(bundle)


def test_observation_directories_carry_the_state(tmp_path, proprio_bundle):
    directory = write_synthetic_observations(tmp_path / 'obs', count=4, seed=0, image_size=32)
    index = directory / 'index.jsonl'
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    lines[0]['proprio'] = [0.1, 0.2, 0.3]
    lines[1]['proprio'] = [0.1, 'x', 0.3]
    lines[2]['proprio'] = []
    index.write_text('\n'.join(json.dumps(line) for line in lines) + '\n')
    observations = read_observations(directory)
    assert len(observations) == 2        # the malformed states are skipped, with a warning
    assert observations[0].proprio.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert observations[1].proprio is None and 'proprio' not in observations[0].meta
    with pytest.raises(ValueError, match='proprio must be a non-empty list of finite numbers'):
        read_observations(directory, strict=True)
    loaded = bench.observation_inputs(directory, 1)
    assert loaded[0][2].tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_bench_generates_states_from_the_training_statistics(proprio_bundle):
    engine = RSDEngine.from_dirs(proprio_bundle, draft_dir='')
    mean, std = bench.state_statistics(engine)
    assert mean.shape == std.shape == (3,)
    generated = bench.generated_inputs(3, seed=0, state=(mean, std))
    assert all(len(proprio) == 3 for _, _, proprio in generated)
    assert engine.predict(*generated[0][:2], proprio=generated[0][2])[0].shape == (8, 7)
