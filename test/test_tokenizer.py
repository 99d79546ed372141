"""RFSQ action tokenizer, action normaliser and `rsd train-tokenizer` (real training, small)."""

import copy
import json

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from rsd_core.checkpoint import CheckpointError, load_tensors, save_component
from rsd_core.normalization import ActionNormalizer
from rsd_core.tokenizer import (
    ActionTokenizer,
    RobustResidualFSQ,
    TokenizerConfig,
    codes_to_tokens,
    tokens_to_codes,
)
from rsd_core.training.tokenizer_fit import (
    fit_tokenizer,
    load_demo_chunks,
    reconstruction_report,
    synthetic_chunks,
)
from rsd_ros.cli import main as rsd_main

SMALL = TokenizerConfig(hidden_size=64)


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """Small matrices: one thread is fastest, and two collapse when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='module')
def chunks() -> np.ndarray:
    return synthetic_chunks(3000, seed=1)


@pytest.fixture(scope='module')
def trained(chunks):
    """(tokenizer, held-out report) after a short real training run."""
    return fit_tokenizer(chunks, SMALL, steps=400, seed=0, progress=False, batch_size=128)


@pytest.fixture(scope='module')
def untrained_report(chunks):
    return fit_tokenizer(chunks, SMALL, steps=0, seed=0, progress=False)[1]


def test_encode_shapes_and_code_range(trained, chunks):
    tokenizer, _ = trained
    tokens = tokenizer.encode(torch.from_numpy(chunks[:64]))
    assert tokens.shape == (64, 8, 8, 16)
    assert tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) <= 6
    assert torch.equal(tokens, tokenizer.encode(chunks[:64]))  # deterministic, numpy accepted
    # Robust scaling: every layer, late ones included, uses the code range.
    for layer in range(8):
        counts = torch.bincount(tokens[:, layer].flatten(), minlength=7)
        assert int((counts > 0).sum()) >= 5, (layer, counts)
        assert int(counts.max()) < tokens[:, layer].numel() / 2, (layer, counts)


def test_quantizer_is_the_library_residual_fsq_at_initialisation():
    from vector_quantize_pytorch import ResidualFSQ

    ours = RobustResidualFSQ(num_layers=8, levels=7).double()
    library = ResidualFSQ(levels=[7], num_quantizers=8).double().eval()
    z = torch.randn(64, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zq, indices = ours(z)  # [B, C], [B, L, C]
    library_zq, library_indices = library(z.unsqueeze(-1))  # [B, C, 1], [B, C, L]
    library_indices = library_indices.long().transpose(1, 2)
    # The library's level step 2/(V-1) is a float32 constant even in float64, which moves its
    # codes by ~1e-8: layers that resolve the latent finer than that (l >= 4) may differ.
    assert torch.equal(indices[:, :4], library_indices[:, :4])
    assert float((indices == library_indices).double().mean()) > 0.95
    torch.testing.assert_close(zq, library_zq.squeeze(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.dequantize(indices), zq, atol=1e-12, rtol=0)


def test_layer_scales_are_learned(trained):
    tokenizer, _ = trained
    initial = 7.0 ** -torch.arange(8.0)
    ratio = tokenizer.rfsq.scales().detach() / initial
    assert bool(torch.isfinite(ratio).all()) and bool((ratio > 0).all())
    assert float((ratio - 1).abs().max()) > 0.05, ratio


def test_decode_with_fewer_layers(trained, chunks):
    tokenizer, _ = trained
    actions = torch.from_numpy(chunks[:32])
    tokens = tokenizer.encode(actions)
    for n_layers in (1, 3, 8):
        decoded = tokenizer.decode(tokens, n_layers)
        assert decoded.shape == (32, 8, 7) and decoded.dtype == torch.float32
        assert torch.equal(decoded, tokenizer.decode(tokens[:, :n_layers]))
    coarse = (tokenizer.decode(tokens, 1) - actions).abs().mean()
    fine = (tokenizer.decode(tokens, 3) - actions).abs().mean()
    assert fine < coarse


def test_training_beats_untrained_and_layers_refine(trained, untrained_report):
    _, report = trained
    assert [row['layers'] for row in report] == list(range(1, 9))
    means = [row['mean_abs_error'] for row in report]
    assert means[-1] < 0.25 * untrained_report[-1]['mean_abs_error']
    assert means[-1] < 0.5 * means[0]
    for fewer, more in zip(means, means[1:], strict=False):
        assert more <= fewer * 1.02 + 1e-5, means
    assert all(row['max_abs_error'] >= row['mean_abs_error'] for row in report)


def test_report_matches_manual_computation(trained, chunks):
    tokenizer, _ = trained
    held = chunks[-100:]
    report = reconstruction_report(tokenizer, held, batch_size=32)  # several batches
    error = (tokenizer.reconstruct(held, 2) - torch.from_numpy(held)).abs()
    assert report[1]['mean_abs_error'] == pytest.approx(float(error.mean()), rel=1e-5)
    assert report[1]['max_abs_error'] == pytest.approx(float(error.max()), rel=1e-6)


def test_save_load_round_trip(trained, chunks, tmp_path):
    tokenizer, report = trained
    tokenizer.save(tmp_path)
    loaded = ActionTokenizer.load(tmp_path)
    actions = torch.from_numpy(chunks[:50])
    tokens = tokenizer.encode(actions)
    assert torch.equal(loaded.encode(actions), tokens)
    for n_layers in (1, 8):
        assert torch.equal(loaded.decode(tokens, n_layers), tokenizer.decode(tokens, n_layers))
    assert loaded.config == SMALL
    assert loaded.normalizer.mode == 'quantile'
    assert loaded.reconstruction == report
    manifest = json.loads((tmp_path / 'action_tokenizer.json').read_text())
    assert manifest['format'] == 'rsd-action-tokenizer'
    assert manifest['config']['hidden_size'] == 64
    assert manifest['reconstruction'] == report
    assert manifest['training']['steps'] == 400


def test_float64(trained, chunks, tmp_path):
    tokenizer, _ = trained
    actions = torch.from_numpy(chunks[:64])
    wide = copy.deepcopy(tokenizer).to(torch.float64)
    tokens = wide.encode(actions)
    assert tokens.dtype == torch.long and int(tokens.max()) <= 6
    decoded = wide.decode(tokens)
    assert decoded.dtype == torch.float64
    torch.testing.assert_close(decoded.float(), tokenizer.decode(tokens), atol=1e-5, rtol=0)
    # Late layers resolve below float32 rounding; the reconstruction does not depend on them.
    torch.testing.assert_close(wide.reconstruct(actions).float(), tokenizer.reconstruct(actions),
                               atol=1e-4, rtol=0)
    assert float((tokens[:, 0] == tokenizer.encode(actions)[:, 0]).float().mean()) > 0.99
    tokenizer.save(tmp_path)
    assert ActionTokenizer.load(tmp_path, dtype=torch.float64).dtype == torch.float64


def test_training_is_deterministic(chunks):
    first, _ = fit_tokenizer(chunks[:500], SMALL, steps=20, seed=3, progress=False)
    state = torch.get_rng_state()
    second, _ = fit_tokenizer(chunks[:500], SMALL, steps=20, seed=3, progress=False)
    assert torch.equal(state, torch.get_rng_state())
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_tokens_codes_layout():
    tokens = torch.randint(0, 7, (2, 8, 8, 16))
    codes = tokens_to_codes(tokens)
    assert codes.shape == (2, 8, 128)
    assert torch.equal(codes, tokens.flatten(-2))
    assert torch.equal(codes_to_tokens(codes), tokens)
    with pytest.raises(ValueError, match=r'\[B, L, C\]'):
        codes_to_tokens(codes[..., :100])


@pytest.mark.parametrize(('make_tokens', 'n_layers', 'message'), [
    (lambda t: t.float(), None, 'integer tokens'),
    (lambda t: t.clamp(max=5) + 2, None, r'0\.\.6'),
    (lambda t: t[:, :, :4], None, r'expected tokens \[B, l, 8, 16\]'),
    (lambda t: torch.cat([t, t[:, :1]], 1), None, r'1 <= l <= 8'),
    (lambda t: t[:, :3], 4, r'n_layers must be an int in 1\.\.3'),
    (lambda t: t, 0, r'n_layers must be an int in 1\.\.8'),
])
def test_decode_rejects_bad_tokens(make_tokens, n_layers, message):
    tokenizer = ActionTokenizer(SMALL)
    tokens = torch.randint(0, 7, (2, 8, 8, 16))
    with pytest.raises(ValueError, match=message):
        tokenizer.decode(make_tokens(tokens), n_layers)


def test_encode_rejects_bad_actions():
    tokenizer = ActionTokenizer(SMALL)
    with pytest.raises(ValueError, match=r'expected actions \[B, 8, 7\]'):
        tokenizer.encode(torch.zeros(2, 8, 6))
    with pytest.raises(ValueError, match='NaN or Inf'):
        tokenizer.encode(torch.full((1, 8, 7), float('nan')))
    with pytest.raises(ValueError, match='floating-point'):
        tokenizer.encode(torch.zeros(1, 8, 7, dtype=torch.long))


# -- normaliser ------------------------------------------------------------------------------


def test_quantile_normalizer_round_trip_and_clipping():
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(5000, 7)) * 0.3)
    normalizer = ActionNormalizer.fit(data, 'quantile')
    x = normalizer.normalize(data)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    inside = ((data >= normalizer.low) & (data <= normalizer.high)).all(-1)
    torch.testing.assert_close(normalizer.unnormalize(x[inside]), data[inside], atol=1e-6,
                               rtol=1e-5)
    assert bool((x[~inside].abs().amax(-1) == 1).all())  # outliers saturate
    rebuilt = ActionNormalizer.from_state_dict(normalizer.state_dict(), 'quantile')
    assert torch.equal(rebuilt.normalize(data), x)


def test_meanstd_normalizer_round_trip():
    data = torch.from_numpy(np.random.default_rng(1).normal(2.0, 0.5, size=(4000, 7)))
    normalizer = ActionNormalizer.fit(data.numpy(), 'meanstd')
    x = normalizer.normalize(data)
    torch.testing.assert_close(x.mean(0), torch.zeros(7, dtype=x.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(7, dtype=x.dtype), atol=1e-3, rtol=0)
    torch.testing.assert_close(normalizer.unnormalize(x), data, atol=1e-5, rtol=0)


@pytest.mark.parametrize('mode', ['quantile', 'meanstd'])
def test_normalizer_constant_dimension(mode):
    data = np.random.default_rng(2).uniform(-1, 1, size=(1000, 7))
    data[:, 6] = 0.3
    normalizer = ActionNormalizer.fit(data, mode)
    assert normalizer.degenerate_dims() == [6]
    x = normalizer.normalize(torch.from_numpy(data))
    assert bool(torch.isfinite(x).all())
    assert bool((x[:, 6] == 0).all())
    back = normalizer.unnormalize(x)
    torch.testing.assert_close(back[:, 6], torch.full((1000,), 0.3, dtype=back.dtype))


def test_quantile_normalizer_keeps_a_rare_gripper_value():
    data = np.zeros((1000, 7))
    data[:, 6] = -1.0
    data[:5, 6] = 1.0  # closed in 0.5 % of the steps: q01 == q99 == -1
    normalizer = ActionNormalizer.fit(data, 'quantile')
    assert normalizer.low[6] == -1 and normalizer.high[6] == 1
    assert normalizer.degenerate_dims() == [0, 1, 2, 3, 4, 5]
    gripper = torch.tensor([[0.0] * 6 + [1.0], [0.0] * 6 + [-1.0]])
    torch.testing.assert_close(normalizer.unnormalize(normalizer.normalize(gripper)), gripper)


def test_normalizer_rejects_bad_input():
    with pytest.raises(ValueError, match='NaN or Inf'):
        ActionNormalizer.fit(np.full((10, 7), np.nan))
    with pytest.raises(ValueError, match=r'actions \[N, A\]'):
        ActionNormalizer.fit(np.zeros(7))
    with pytest.raises(ValueError, match="'minmax' is not one of"):
        ActionNormalizer.fit(np.zeros((10, 7)), 'minmax')
    with pytest.raises(ValueError, match=r'expected actions \[\.\.\., 7\]'):
        ActionNormalizer.identity(7).normalize(torch.zeros(3, 6))
    with pytest.raises(ValueError, match='high < low'):
        ActionNormalizer('quantile', {'low': torch.ones(7), 'high': torch.zeros(7)})


# -- checkpoint errors -------------------------------------------------------------------------


def _rewrite(directory, tensors=None, manifest=None):
    """Re-save a tokenizer with edited tensors / manifest (a consistent, wrong checkpoint)."""
    old = json.loads((directory / 'action_tokenizer.json').read_text())
    old.pop('weights_sha256')
    tensors = tensors if tensors is not None else load_tensors(
        directory / 'action_tokenizer.safetensors')
    save_component(directory, 'action_tokenizer', tensors, manifest or old)


def _edit_manifest(directory, **changes):
    manifest = json.loads((directory / 'action_tokenizer.json').read_text())
    for key, value in changes.items():
        section, _, field = key.partition('__')
        if field:
            manifest[section][field] = value
        else:
            manifest[section] = value
    (directory / 'action_tokenizer.json').write_text(json.dumps(manifest))


def _edit_tensors(directory, edit):
    tensors = load_tensors(directory / 'action_tokenizer.safetensors')
    edit(tensors)
    _rewrite(directory, tensors)


def _set(tensors, key, value):
    tensors[key] = value


CORRUPTIONS = {
    'no manifest': (lambda d: (d / 'action_tokenizer.json').unlink(), 'manifest not found'),
    'manifest not json': (lambda d: (d / 'action_tokenizer.json').write_text('{'),
                          'not valid JSON'),
    'wrong format': (lambda d: _edit_manifest(d, format='rsd-draft'),
                     "expected format 'rsd-action-tokenizer', found 'rsd-draft'"),
    'wrong version': (lambda d: _edit_manifest(d, version=7), 'version 7, this code reads'),
    'bad config value': (lambda d: _edit_manifest(d, config__levels='seven'),
                         r'invalid config \(TokenizerConfig\.levels must be a positive int'),
    'unknown config field': (lambda d: _edit_manifest(d, config__codebook=3),
                             r"unknown config fields \['codebook'\]"),
    'bad normaliser mode': (lambda d: _edit_manifest(d, normalizer__mode='minmax'),
                            "normalizer.mode must be one of .* found 'minmax'"),
    'no weights': (lambda d: (d / 'action_tokenizer.safetensors').unlink(),
                   'weights file not found'),
    'weights not safetensors': (lambda d: (d / 'action_tokenizer.safetensors').write_bytes(
        b'\x00' * 64), 'not a readable safetensors file'),
    'weights from another checkpoint': (
        lambda d: save_file({k: v + 1 for k, v in load_tensors(
            d / 'action_tokenizer.safetensors').items()}, str(d / 'action_tokenizer.safetensors')),
        'sha256 does not match weights_sha256'),
    'missing key': (lambda d: _edit_tensors(d, lambda t: t.pop('decoder.linear.weight')),
                    r"missing keys \['decoder.linear.weight'\]"),
    'unexpected key': (lambda d: _edit_tensors(d, lambda t: _set(t, 'rfsq.scales',
                                                                 torch.ones(8))),
                       r"unexpected keys \['rfsq.scales'\]"),
    'config does not match weights': (
        lambda d: _rewrite(d, manifest=dict(
            json.loads((d / 'action_tokenizer.json').read_text()),
            config=dict(SMALL.to_dict(), hidden_size=32))),
        r'encoder.mlp.0.weight: shape \[64, 56\], expected \[32, 56\]'),
    'non-finite weights': (
        lambda d: _edit_tensors(d, lambda t: t['encoder.linear.bias'].fill_(float('nan'))),
        r"non-finite values in \['encoder.linear.bias'\]"),
    'integer weights': (
        lambda d: _edit_tensors(d, lambda t: _set(t, 'decoder.linear.bias',
                                                  torch.zeros(56, dtype=torch.long))),
        r"non-floating-point tensors \['decoder.linear.bias'\]"),
    'bad normaliser statistics': (
        lambda d: _edit_tensors(d, lambda t: _set(t, 'normalizer.high', t['normalizer.low'] - 1)),
        r'invalid normaliser statistics \(quantile normaliser has high < low'),
}


@pytest.mark.parametrize('case', list(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused(case, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    ActionTokenizer(SMALL, ActionNormalizer.fit(synthetic_chunks(200).reshape(-1, 7))).save(
        tmp_path)
    ActionTokenizer.load(tmp_path)  # intact before the corruption
    corrupt(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        ActionTokenizer.load(tmp_path)


# -- data and command line ---------------------------------------------------------------------


def test_synthetic_chunks():
    chunks = synthetic_chunks(2000, seed=5)
    assert chunks.shape == (2000, 8, 7) and chunks.dtype == np.float32
    assert chunks.min() >= -1 and chunks.max() <= 1
    assert np.array_equal(chunks, synthetic_chunks(2000, seed=5))
    assert not np.array_equal(chunks, synthetic_chunks(2000, seed=6))
    gripper = chunks[..., 6]
    assert set(np.unique(gripper)) == {-1.0, 1.0}
    switches = (np.diff(gripper, axis=1) != 0).sum(1)
    assert switches.max() == 1 and 0.05 < (switches == 1).mean() < 0.3
    # Smooth: step-to-step change well below the spread of the translation values.
    assert np.abs(np.diff(chunks[..., :3], axis=1)).mean() < 0.3 * np.abs(chunks[..., :3]).mean()
    # Correlated translations: the direction of motion persists from step to step.
    translation = chunks[..., :3]
    norm = np.linalg.norm(translation, axis=-1)  # [n, T]
    moving = (norm[:, 1:] > 0.3) & (norm[:, :-1] > 0.3)
    cosine = (translation[:, 1:] * translation[:, :-1]).sum(-1) / (norm[:, 1:] * norm[:, :-1])
    assert np.median(cosine[moving]) > 0.9
    assert np.abs(chunks[..., 3:6]).mean() < 0.5 * np.abs(chunks[..., :3]).mean()


def _write_demos(path, lengths):
    rng = np.random.default_rng(0)
    episodes = {}
    with h5py.File(path, 'w') as stream:
        data = stream.create_group('data')
        for name, length in lengths.items():
            episodes[name] = rng.uniform(-1, 1, size=(length, 7)).astype(np.float32)
            data.create_dataset(f'{name}/actions', data=episodes[name])
    return episodes


def test_load_demo_chunks(tmp_path):
    episodes = _write_demos(tmp_path / 'demos.hdf5', {'demo_10': 3, 'demo_2': 12})
    chunks = load_demo_chunks([tmp_path / 'demos.hdf5'])
    assert chunks.shape == (15, 8, 7) and chunks.dtype == np.float32
    first = episodes['demo_2']  # demo_2 comes before demo_10
    assert np.array_equal(chunks[0], first[:8])
    assert np.array_equal(chunks[4], first[4:12])
    assert np.array_equal(chunks[6], np.concatenate([first[6:], np.repeat(first[-1:], 2, 0)]))
    last = episodes['demo_10']
    assert np.array_equal(chunks[12], np.concatenate([last, np.repeat(last[-1:], 5, 0)]))
    assert np.array_equal(load_demo_chunks([tmp_path]), chunks)  # a directory works too


def test_load_demo_chunks_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match='no such demo file or directory'):
        load_demo_chunks([tmp_path / 'missing.hdf5'])
    (tmp_path / 'text.hdf5').write_text('not hdf5')
    with pytest.raises(ValueError, match='not a readable HDF5 file'):
        load_demo_chunks([tmp_path / 'text.hdf5'])
    with h5py.File(tmp_path / 'empty.hdf5', 'w') as stream:
        stream.create_group('observations')
    with pytest.raises(ValueError, match='no "data" group'):
        load_demo_chunks([tmp_path / 'empty.hdf5'])
    with h5py.File(tmp_path / 'wide.hdf5', 'w') as stream:
        stream.create_dataset('data/demo_0/actions', data=np.zeros((4, 8)))
    with pytest.raises(ValueError, match=r'shape \[4, 8\], expected \[N >= 1, 7\]'):
        load_demo_chunks([tmp_path / 'wide.hdf5'])


def test_cli_train_tokenizer(tmp_path, capsys):
    _write_demos(tmp_path / 'demos.hdf5', {'demo_0': 60, 'demo_1': 40})
    out = tmp_path / 'tok'
    assert rsd_main(['train-tokenizer', '--demos', str(tmp_path / 'demos.hdf5'), '--out',
                     str(out), '--steps', '30', '--hidden-size', '32', '--norm',
                     'meanstd']) == 0
    printed = capsys.readouterr().out
    assert 'layers  mean_abs_error  max_abs_error' in printed
    assert len([line for line in printed.splitlines() if line.split()[:1] == ['8']]) == 1
    loaded = ActionTokenizer.load(out)
    assert loaded.normalizer.mode == 'meanstd'
    assert loaded.training_info['train_chunks'] == 90
    assert loaded.training_info['source'].startswith('demos:')
    assert len(loaded.reconstruction) == 8
    assert rsd_main(['train-tokenizer', '--demos', str(tmp_path / 'nothing'), '--out',
                     str(out)]) == 1


def test_fit_tokenizer_rejects_bad_chunks():
    with pytest.raises(ValueError, match=r'chunks \[n >= 2, 8, 7\]'):
        fit_tokenizer(np.zeros((10, 8, 6)), steps=1, progress=False)
    with pytest.raises(ValueError, match='NaN or Inf'):
        fit_tokenizer(np.full((10, 8, 7), np.nan), steps=1, progress=False)
