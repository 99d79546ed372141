"""`rsd refit-decoder`: a coarse-layer decoder, same codes, a certificate shaped at a depth."""

import json
from pathlib import Path

import numpy as np
import torch

from rsd_core.tokenizer import ActionTokenizer, TokenizerConfig
from rsd_core.training.decoder_refit import linear_bound, refit_decoder
from rsd_core.training.tokenizer_fit import fit_tokenizer, synthetic_chunks
from rsd_ros import cli


def small_tokenizer() -> tuple[ActionTokenizer, np.ndarray]:
    chunks = synthetic_chunks(3000, seed=2)
    tokenizer, _ = fit_tokenizer(chunks, TokenizerConfig(hidden_size=32), steps=150, seed=0,
                                 progress=False)
    return tokenizer, chunks


def test_refit_keeps_the_codes_and_shapes_the_certificate(tmp_path):
    old, chunks = small_tokenizer()
    before = float(linear_bound(old, 3).max().detach())
    new = refit_decoder(old, chunks, coarse_layers=2, steps=150, bound_depth=3,
                        bound_target=before / 2, bound_weight=1.0, progress=False)
    assert new.config.coarse_layers == 2 and new.config.mlp_layers == 2
    sample = torch.from_numpy(chunks[:256])
    assert torch.equal(new.encode(sample), old.encode(sample))        # same encoder + scales
    after = float(new.truncation_bound(new.encode(sample[:4]), 3).max())
    assert after < before
    info = new.training_info['decoder_refit']
    assert len(info['reconstruction_before']) == 8 and len(new.reconstruction) == 8
    assert info['certified_bound_at_depth'] == float(linear_bound(new, 3).max())
    # refitting again from the refitted one is a no-op on the codes as well
    new.save(tmp_path / 'tok')
    loaded = ActionTokenizer.load(tmp_path / 'tok')
    assert loaded.config == new.config
    tokens = new.encode(sample[:8])
    assert torch.equal(loaded.decode(tokens), new.decode(tokens))


def test_a_manifest_without_coarse_layers_loads_as_the_plain_decoder(tmp_path):
    old, _ = small_tokenizer()
    old.save(tmp_path / 'tok')
    manifest_path = tmp_path / 'tok' / 'action_tokenizer.json'
    manifest = json.loads(manifest_path.read_text())
    del manifest['config']['coarse_layers']
    manifest_path.write_text(json.dumps(manifest))
    loaded = ActionTokenizer.load(tmp_path / 'tok')
    assert loaded.config.coarse_layers == 0 and loaded.config.mlp_layers == 8


def test_refit_decoder_command(tmp_path, capsys):
    import h5py

    old, chunks = small_tokenizer()
    old.save(tmp_path / 'tok')
    with h5py.File(tmp_path / 'demo.hdf5', 'w') as f:
        for i in range(3):
            f.create_dataset(f'data/demo_{i}/actions', data=chunks[i * 100:(i + 1) * 100, 0])
    status = cli.main(['refit-decoder', str(tmp_path / 'tok'), '--demos',
                       str(tmp_path / 'demo.hdf5'), '--out', str(tmp_path / 'new'),
                       '--steps', '20', '--coarse-layers', '2'])
    assert status == 0
    out = capsys.readouterr().out
    assert 'before the refit' in out and 'certified bound with 3 layers kept' in out
    assert ActionTokenizer.load(tmp_path / 'new').config.coarse_layers == 2
    assert cli.main(['refit-decoder', str(tmp_path / 'tok'), '--demos',
                     str(tmp_path / 'demo.hdf5'), '--out', str(tmp_path / 'bad'),
                     '--coarse-layers', '4', '--bound-depth', '3']) == 1


def write_action_demo(path, actions: np.ndarray) -> None:
    import h5py

    with h5py.File(path, 'w') as f:
        for i, episode in enumerate(np.array_split(actions, 3)):
            f.create_dataset(f'data/demo_{i}/actions', data=episode)


def test_refit_decoder_into_a_bundle_keeps_it_loadable_and_its_weights(tiny_bundle, tmp_path,
                                                                         capsys):
    """In place: the bundle's tokenizer is replaced, the manifest records its new file hash
    (so the loader's integrity check passes), the weights hash and the codes stay."""
    import shutil

    from rsd_core.bundle import bundle_weights_sha256, file_hash_problems, load_bundle_manifest
    from rsd_core.main_model import MainModel

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    before = ActionTokenizer.load(bundle / 'action_tokenizer')
    weights = load_bundle_manifest(bundle)['weights_sha256']
    rng = np.random.default_rng(0)
    actions = np.cumsum(rng.normal(0, 0.05, (600, before.config.action_dim)), axis=0)
    write_action_demo(tmp_path / 'demo.hdf5', np.clip(actions, -1, 1).astype(np.float32))
    status = cli.main(['refit-decoder', str(bundle), '--demos', str(tmp_path / 'demo.hdf5'),
                       '--steps', '20', '--coarse-layers', '2'])
    assert status == 0 and 'manifest updated' in capsys.readouterr().out
    manifest = load_bundle_manifest(bundle)
    assert file_hash_problems(bundle, manifest) == []
    assert manifest['weights_sha256'] == weights == bundle_weights_sha256(bundle)
    assert manifest['provenance']['action_tokenizer_replaced']['by'] == 'rsd refit-decoder'
    after = MainModel.from_dir(bundle)
    assert ActionTokenizer.load(bundle / 'action_tokenizer').config.coarse_layers == 2
    sample = torch.from_numpy(np.clip(actions[:8 * before.config.chunk_len], -1, 1)
                              .astype(np.float32).reshape(8, before.config.chunk_len, -1))
    assert torch.equal(ActionTokenizer.load(bundle / 'action_tokenizer').encode(sample),
                       before.encode(sample))
    assert after.weights_hash == weights
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith('.')) == []


def test_refit_decoder_refuses_a_corrupted_bundle_and_changes_nothing(tiny_bundle, tmp_path,
                                                                      caplog):
    import shutil

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    heads = bundle / 'heads.safetensors'
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0x01
    heads.write_bytes(bytes(data))
    files = {p: p.read_bytes() for p in bundle.rglob('*') if p.is_file()}
    actions = np.random.default_rng(0).uniform(-1, 1, (600, 7)).astype(np.float32)
    write_action_demo(tmp_path / 'demo.hdf5', actions)
    assert cli.main(['refit-decoder', str(bundle), '--demos', str(tmp_path / 'demo.hdf5'),
                     '--steps', '5']) == 1
    assert 'heads.safetensors: sha256' in caplog.text and 'not replacing' in caplog.text
    assert {p: p.read_bytes() for p in bundle.rglob('*') if p.is_file()} == files
    assert cli.main(['refit-decoder', str(bundle / 'action_tokenizer'), '--demos',
                     str(tmp_path / 'demo.hdf5'), '--steps', '5']) == 1      # no --out
