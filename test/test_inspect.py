"""`rsd inspect`: every kind of checkpoint, every bad one flagged with its reason and exit 1."""

from dataclasses import asdict
import json
import shutil

import pytest
import torch

from rsd_core.checkpoint import save_component
from rsd_core.draft import DraftConfig, DraftModel
from rsd_ros.cli import main as rsd


def inspect(capsys, *args) -> tuple[int, str]:
    status = rsd(['inspect', *map(str, args)])
    return status, capsys.readouterr().out


def inspect_json(capsys, *args) -> tuple[int, dict]:
    status, out = inspect(capsys, *args, '--json')
    return status, json.loads(out)


@pytest.fixture(scope='module')
def main_manifest(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / 'manifest.json').read_text())


def small_draft(hidden: int) -> DraftModel:
    torch.manual_seed(0)
    return DraftModel(DraftConfig(hidden_size=hidden, d_model=64, n_heads=4, ffn=128,
                                  head_hidden=32))


def save_draft(directory, main_manifest, hidden=None, trained=True, tensors=None,
               main_hash=None):
    draft = small_draft(hidden or main_manifest['hidden_size'])
    provenance = {'trained': trained,
                  'main_weights_sha256': main_hash or main_manifest['weights_sha256'],
                  'metrics': {'held_out': {'token_accuracy': [0.9, 0.8, 0.7],
                                           'exact_match': [0.5, 0.2, 0.1],
                                           'mean_accepted_layers': 0.8},
                              'held_out_samples': 100}}
    if tensors is None:
        draft.save(directory, provenance)
    else:
        save_component(directory, 'draft', tensors(draft.state_dict()), {
            'format': 'rsd-draft', 'version': 1, 'config': asdict(draft.config),
            'provenance': provenance})
    return directory


def test_bundle_with_its_draft(tiny_bundle, main_manifest, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    save_draft(bundle / 'draft', main_manifest)
    status, report = inspect_json(capsys, bundle)
    assert status == 0, report['problems']
    assert report['kind'] == 'bundle' and report['usable'] and not report['problems']
    components = {c['name']: c for c in report['components']}
    assert set(components) == {'bundle', 'backbone', 'heads', 'action_tokenizer', 'draft'}
    draft = components['draft']['facts']
    assert draft['input_projection'] == {'present': True, 'shape': [64, 64], 'input_size': 64,
                                         'trained': True}
    assert draft['hidden_size_compatible'] is True and draft['provenance_matches_main'] is True
    assert draft['draft_kind'] == 'v1 seed'
    names = {t['name']: t for t in components['heads']['tensors']}
    assert names['rfsq_head.proj.weight']['shape'] == [896, 64]
    assert all(t['finite'] and t['dtype'] == 'float32' for t in names.values())
    status, text = inspect(capsys, bundle)
    assert status == 0 and text.startswith(f'bundle {bundle}: usable')
    assert 'input_proj.weight' in text and 'exact-layer match [0.500, 0.200, 0.100]' in text


def test_draft_dir_checked_against_main(tiny_bundle, main_manifest, tmp_path, capsys):
    directory = save_draft(tmp_path / 'draft', main_manifest)
    status, report = inspect_json(capsys, directory, '--main', tiny_bundle)
    assert status == 0 and report['kind'] == 'draft'
    assert report['components'][0]['facts']['hidden_size_compatible'] is True
    status, report = inspect_json(capsys, directory)
    assert status == 0
    assert any('no main model' in w for w in report['warnings'])


def test_tokenizer_dir(tiny_bundle, capsys):
    status, report = inspect_json(capsys, tiny_bundle / 'action_tokenizer')
    assert status == 0 and report['kind'] == 'tokenizer'
    assert report['components'][0]['format'] == 'rsd-action-tokenizer'
    assert report['components'][0]['tensors']


def drop_projection(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith('input_proj.')}


def nan_head(tensors):
    tensors['heads.2.3.bias'][3] = float('nan')
    return tensors


@pytest.mark.parametrize('case, expected', [
    ('projection_removed', 'input projection weights missing: input_proj.weight, '
                           'input_proj.bias'),
    ('wrong_hidden_size', 'input projection takes hidden size 96, but the main model has '
                          'hidden size 64'),
    ('nan', "non-finite values (NaN/Inf) in ['heads.2.3.bias']"),
    ('pickle', 'draft.safetensors is not a safetensors file, it is a zip archive '
               '(torch.save format)'),
    ('corrupt', 'draft.safetensors is not a readable safetensors file'),
    ('wrong_manifest', "draft.json: expected format 'rsd-draft', found 'rsd-main-heads'"),
])
def test_bad_drafts_are_flagged(case, expected, tiny_bundle, main_manifest, tmp_path, capsys):
    directory = tmp_path / 'draft'
    if case == 'projection_removed':
        save_draft(directory, main_manifest, tensors=drop_projection)
    elif case == 'wrong_hidden_size':
        save_draft(directory, main_manifest, hidden=96)
    elif case == 'nan':
        save_draft(directory, main_manifest, tensors=nan_head)
    else:
        save_draft(directory, main_manifest)
    if case == 'pickle':
        torch.save(small_draft(64).state_dict(), directory / 'draft.safetensors')
    elif case == 'corrupt':
        data = (directory / 'draft.safetensors').read_bytes()
        (directory / 'draft.safetensors').write_bytes(data[:100] + b'\0' * 50)
    elif case == 'wrong_manifest':
        manifest = json.loads((directory / 'draft.json').read_text())
        (directory / 'draft.json').write_text(json.dumps(dict(manifest, format='rsd-main-heads')))
    status, report = inspect_json(capsys, directory, '--main', tiny_bundle)
    assert status == 1 and not report['usable']
    assert any(expected in p for p in report['problems']), report['problems']
    status, text = inspect(capsys, directory, '--main', tiny_bundle)
    assert status == 1 and 'UNUSABLE' in text and expected in text


def test_draft_in_a_bundle_of_another_hidden_size(tiny_bundle, main_manifest, tmp_path,
                                                  capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    save_draft(bundle / 'draft', main_manifest, hidden=32)
    for path in (bundle, bundle / 'draft'):
        status, report = inspect_json(capsys, path)
        assert status == 1
        assert any('hidden size 32, but the main model has hidden size 64' in p
                   for p in report['problems']), report['problems']


def test_untrained_or_foreign_draft_warns_and_strict_fails(tiny_bundle, main_manifest, tmp_path,
                                                          capsys):
    untrained = save_draft(tmp_path / 'untrained', main_manifest, trained=False)
    status, report = inspect_json(capsys, untrained, '--main', tiny_bundle)
    assert status == 0
    assert report['components'][0]['facts']['input_projection']['trained'] is False
    assert any('not trained' in w for w in report['warnings'])
    assert inspect(capsys, untrained, '--main', tiny_bundle, '--strict')[0] == 1
    foreign = save_draft(tmp_path / 'foreign', main_manifest, main_hash='f' * 64)
    status, report = inspect_json(capsys, foreign, '--main', tiny_bundle)
    assert status == 0
    assert any('f' * 64 in w and main_manifest['weights_sha256'] in w
               for w in report['warnings'])


def test_single_files(tiny_bundle, tmp_path, capsys):
    status, report = inspect_json(capsys, tiny_bundle / 'heads.safetensors')
    assert status == 0 and report['kind'] == 'heads'
    pickle = tmp_path / 'weights.pt'
    torch.save({'w': torch.zeros(2)}, pickle)
    status, report = inspect_json(capsys, pickle)
    assert status == 1
    assert any('not a safetensors file, it is a zip archive' in p for p in report['problems'])
    text_file = tmp_path / 'notes.txt'
    text_file.write_text('hello')
    status, report = inspect_json(capsys, text_file)
    assert status == 1 and any('not a safetensors file' in p for p in report['problems'])
    status, report = inspect_json(capsys, tmp_path / 'nowhere')
    assert status == 1 and report['problems'] == ['nowhere: path not found']


def test_bundle_with_nan_heads(tiny_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    from safetensors.torch import load_file, save_file

    tensors = load_file(bundle / 'heads.safetensors')
    tensors['layer_embedding.layer.weight'][0, 0] = float('inf')
    save_file(tensors, bundle / 'heads.safetensors')
    status, report = inspect_json(capsys, bundle)
    assert status == 1
    assert "heads: non-finite values (NaN/Inf) in ['layer_embedding.layer.weight']" \
        in report['problems']


def flip_bit_in_first_tensor(path) -> None:
    """Flip the lowest bit of the first value of a safetensors file's first float tensor (a
    mantissa bit: the value stays finite, only the hash can tell)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + header_len])
    start = min(v['data_offsets'][0] for k, v in header.items()
                if k != '__metadata__' and v['dtype'].startswith('F'))
    data[8 + header_len + start] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_bundle_weight_files_verified(tiny_bundle, capsys):
    status, report = inspect_json(capsys, tiny_bundle)
    assert status == 0
    assert report['components'][0]['facts']['files_sha256'] == '3 weight files verified'


def test_a_flipped_bit_in_a_backbone_tensor_is_unusable_like_the_loader_says(
        tiny_bundle, tmp_path, capsys):
    from rsd_core.checkpoint import CheckpointError, file_sha256
    from rsd_core.main_model import MainModel

    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    weights = bundle / 'backbone' / 'model.safetensors'
    expected = json.loads((bundle / 'manifest.json').read_text())['files_sha256'][
        'backbone/model.safetensors']
    flip_bit_in_first_tensor(weights)
    actual = file_sha256(weights)
    problem = (f'bundle: backbone/model.safetensors: sha256 {actual[:12]}, manifest expects '
               f'{expected[:12]}')
    status, report = inspect_json(capsys, bundle)
    assert status == 1 and not report['usable']
    assert report['problems'] == [problem]
    components = {c['name']: c for c in report['components']}
    assert components['backbone']['facts']['finite'] is True     # only the hash sees it
    assert components['bundle']['facts']['files_sha256'] == 'MISMATCH'
    status, text = inspect(capsys, bundle)
    assert status == 1 and 'UNUSABLE' in text and f'  - {problem}' in text
    with pytest.raises(CheckpointError, match=problem.removeprefix('bundle: ')):
        MainModel.from_dir(bundle)


def test_a_bundle_without_file_hashes_is_unverified_and_loads(tiny_bundle, tmp_path, capsys):
    from rsd_core.main_model import MainModel

    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    manifest = json.loads((bundle / 'manifest.json').read_text())
    del manifest['files_sha256']
    (bundle / 'manifest.json').write_text(json.dumps(manifest))
    status, report = inspect_json(capsys, bundle)
    assert status == 0 and report['usable']
    assert report['components'][0]['facts']['files_sha256'].startswith('unverified')
    assert any('weight files unverified' in w for w in report['warnings']), report['warnings']
    status, text = inspect(capsys, bundle)
    assert status == 0 and 'files_sha256: unverified: the manifest records no file hashes' \
        in text
    assert inspect(capsys, bundle, '--strict')[0] == 1
    assert MainModel.from_dir(bundle).weights_hash == manifest['weights_sha256']


def test_malformed_file_hashes_are_refused_by_both(tiny_bundle, tmp_path, capsys):
    from rsd_core.checkpoint import CheckpointError
    from rsd_core.main_model import MainModel

    bundle = shutil.copytree(tiny_bundle, tmp_path / 'bundle')
    manifest = json.loads((bundle / 'manifest.json').read_text())
    (bundle / 'manifest.json').write_text(json.dumps(dict(manifest, files_sha256=['x'])))
    status, report = inspect_json(capsys, bundle)
    assert status == 1
    assert any('files_sha256 is not an object' in p for p in report['problems'])
    with pytest.raises(CheckpointError, match='files_sha256 is not an object'):
        MainModel.from_dir(bundle)
