"""Draft model: shapes, save/load round trip, and every way a checkpoint is refused."""

from dataclasses import asdict
import json
import logging

import pytest
import torch

from rsd_core.checkpoint import CheckpointError, save_component
from rsd_core.draft import DraftConfig, DraftModel

HIDDEN = 64
MAIN_HASH = 'a' * 64


def small_config(**overrides) -> DraftConfig:
    values = dict(hidden_size=HIDDEN, d_model=64, n_heads=4, ffn=128, head_hidden=32)
    return DraftConfig(**{**values, **overrides})


def write_draft(directory, tensors, config, provenance=None, fmt='rsd-draft'):
    """Write a draft checkpoint from raw tensors, bypassing DraftModel.save's checks."""
    provenance = provenance or {'trained': True, 'main_weights_sha256': MAIN_HASH}
    manifest = {'format': fmt, 'version': 1, 'config': asdict(config), 'provenance': provenance}
    save_component(directory, 'draft', tensors, manifest)
    return directory


@pytest.fixture
def draft():
    torch.manual_seed(0)
    return DraftModel(small_config()).eval()


@pytest.mark.parametrize('k', [1, 3, 6])
def test_forward_shapes(k):
    model = DraftModel(DraftConfig(hidden_size=96, num_proposals=k)).eval()
    h0 = torch.randn(5, 96)
    logits = model(h0)
    assert logits.shape == (5, k, 128, 7)
    codes, propose_logits = model.propose(h0)
    assert codes.shape == (5, k, 128) and codes.dtype == torch.long
    assert torch.equal(codes, logits.argmax(-1))
    assert torch.equal(propose_logits, logits)
    assert model.input_proj.weight.shape == (512, 96)
    assert 'input_proj.weight' in model.state_dict()


def test_proposals_depend_on_h0_and_position(draft):
    h0 = torch.randn(2, HIDDEN)
    logits = draft(h0)
    assert not torch.allclose(logits[0], logits[1])
    assert not torch.allclose(logits[:, 0], logits[:, 1])


@pytest.mark.parametrize('k', [0, 7])
def test_config_refuses_bad_num_proposals(k):
    with pytest.raises(ValueError, match=r'num_proposals \(K\) must be in 1\.\.6'):
        DraftConfig(hidden_size=HIDDEN, num_proposals=k)


def test_save_load_round_trip(tmp_path, draft, caplog):
    draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH,
                          'metrics': {'held_out_loss': 1.0}})
    manifest = json.loads((tmp_path / 'draft.json').read_text())
    assert manifest['format'] == 'rsd-draft'
    assert manifest['config']['hidden_size'] == HIDDEN
    assert manifest['provenance']['trained'] is True
    assert manifest['provenance']['main_weights_sha256'] == MAIN_HASH
    assert manifest['provenance']['created']
    with caplog.at_level(logging.WARNING):
        loaded = DraftModel.load(tmp_path, HIDDEN, main_weights_hash=MAIN_HASH,
                                 dtype=torch.float64)
    assert not caplog.records
    assert loaded.input_proj.weight.dtype == torch.float64 and not loaded.training
    h0 = torch.randn(3, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(loaded(h0), draft.double()(h0))


def test_save_requires_trained_flag(tmp_path, draft):
    with pytest.raises(ValueError, match='trained'):
        draft.save(tmp_path, {'main_weights_sha256': MAIN_HASH})


def test_refuses_removed_projection(tmp_path, draft):
    tensors = {k: v for k, v in draft.state_dict().items() if not k.startswith('input_proj')}
    write_draft(tmp_path, tensors, draft.config)
    with pytest.raises(CheckpointError) as info:
        DraftModel.load(tmp_path, HIDDEN)
    assert 'input projection weights missing: input_proj.weight, input_proj.bias' \
        in str(info.value)


def test_refuses_wrong_hidden_size(tmp_path, draft):
    draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH})
    with pytest.raises(CheckpointError, match=rf'takes hidden size {HIDDEN}, but the main '
                                              r'model has hidden size 96'):
        DraftModel.load(tmp_path, 96)


def test_refuses_nan_weights(tmp_path, draft):
    tensors = draft.state_dict()
    tensors['heads.1.3.weight'] = tensors['heads.1.3.weight'].clone()
    tensors['heads.1.3.weight'][0, 0] = float('nan')
    tensors['input_proj.bias'] = torch.full_like(tensors['input_proj.bias'], float('inf'))
    write_draft(tmp_path, tensors, draft.config)
    with pytest.raises(CheckpointError,
                       match=r"non-finite values \(NaN/Inf\) in \['heads.1.3.weight', "
                             r"'input_proj.bias'\]"):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_wrong_shape(tmp_path, draft):
    tensors = draft.state_dict()
    tensors['heads.0.3.weight'] = torch.zeros(128 * 5, 32)
    write_draft(tmp_path, tensors, draft.config)
    with pytest.raises(CheckpointError, match=r'heads.0.3.weight: shape \[640, 32\], '
                                              r'expected \[896, 32\]'):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_missing_and_unexpected_keys(tmp_path, draft):
    tensors = draft.state_dict()
    del tensors['norm.weight']
    tensors['extra.weight'] = torch.zeros(2)
    write_draft(tmp_path, tensors, draft.config)
    with pytest.raises(CheckpointError) as info:
        DraftModel.load(tmp_path, HIDDEN)
    assert "missing keys ['norm.weight']" in str(info.value)
    assert "unexpected keys ['extra.weight']" in str(info.value)


def test_refuses_torch_save_pickle(tmp_path, draft):
    draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH})
    torch.save(draft.state_dict(), tmp_path / 'draft.safetensors')
    with pytest.raises(CheckpointError, match=r'not a safetensors file, it is a zip archive '
                                              r'\(torch.save format\); pickled checkpoints '
                                              r'are never loaded'):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_directory_with_only_a_pickle(tmp_path, draft):
    torch.save(draft.state_dict(), tmp_path / 'draft.pt')
    with pytest.raises(CheckpointError, match=r"no draft.safetensors .*\['draft.pt'\].*never"):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_corrupt_bytes(tmp_path, draft):
    weights = draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH})
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_wrong_or_missing_manifest(tmp_path, draft):
    write_draft(tmp_path, draft.state_dict(), draft.config, fmt='rsd-action-tokenizer')
    with pytest.raises(CheckpointError, match=r"expected format 'rsd-draft', "
                                              r"found 'rsd-action-tokenizer'"):
        DraftModel.load(tmp_path, HIDDEN)
    (tmp_path / 'draft.json').unlink()
    with pytest.raises(CheckpointError, match='manifest not found'):
        DraftModel.load(tmp_path, HIDDEN)


def test_refuses_bad_config_in_manifest(tmp_path, draft):
    draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH})
    manifest = json.loads((tmp_path / 'draft.json').read_text())
    manifest['config']['num_proposals'] = 9
    (tmp_path / 'draft.json').write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r'invalid draft config: .*got 9'):
        DraftModel.load(tmp_path, HIDDEN)


def test_hash_mismatch_warns_and_strict_refuses(tmp_path, draft, caplog):
    draft.save(tmp_path, {'trained': True, 'main_weights_sha256': MAIN_HASH})
    other = 'b' * 64
    with caplog.at_level(logging.WARNING, logger='rsd_core.draft'):
        DraftModel.load(tmp_path, HIDDEN, main_weights_hash=other)
    messages = [r.getMessage() for r in caplog.records]
    assert any(MAIN_HASH in m and other in m for m in messages), messages
    with pytest.raises(CheckpointError, match=f'sha256 {MAIN_HASH}.*sha256 {other}'):
        DraftModel.load(tmp_path, HIDDEN, main_weights_hash=other, strict_provenance=True)


def test_untrained_manifest_warns(tmp_path, draft, caplog):
    draft.save(tmp_path, {'trained': False, 'main_weights_sha256': MAIN_HASH})
    with caplog.at_level(logging.WARNING, logger='rsd_core.draft'):
        DraftModel.load(tmp_path, HIDDEN, main_weights_hash=MAIN_HASH)
    assert any('not trained' in r.getMessage() for r in caplog.records)
