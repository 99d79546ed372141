"""Bundle layout, hashes, presets, default location and `rsd build-default`."""

import json
import os
from pathlib import Path
import shutil

import pytest
import torch

from rsd_core import bundle, bundle_build
from rsd_core.bundle import bundle_problems, bundle_weights_sha256, default_bundle_dir
from rsd_core.bundle_build import PRESETS, build_main_bundle
from rsd_core.checkpoint import load_tensors, save_component
from rsd_core.tokenizer import ActionTokenizer
from rsd_core.training import policy
from rsd_ros.cli import main as rsd


@pytest.fixture(scope='module')
def action_tokenizer(tiny_bundle):
    return ActionTokenizer.load(tiny_bundle / 'action_tokenizer')


def test_test_bundle_has_the_documented_layout(tiny_bundle):
    assert bundle_problems(tiny_bundle) == []
    manifest = json.loads((tiny_bundle / 'manifest.json').read_text())
    assert manifest['format'] == 'rsd-main-bundle' and manifest['version'] == 1
    assert {k: manifest[k] for k in ('hidden_size', 'num_layers', 'codes_per_layer', 'levels',
                                     'chunk_len', 'action_dim', 'image_size')} == {
        'hidden_size': 64, 'num_layers': 8, 'codes_per_layer': 128, 'levels': 7,
        'chunk_len': 8, 'action_dim': 7, 'image_size': 112}
    assert manifest['action_names'] == ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
    assert manifest['control_period_s'] == 0.05
    assert '{instruction}' in manifest['prompt_template']
    provenance = manifest['provenance']
    assert provenance['preset'] == 'tiny' and provenance['seed'] == 0
    assert provenance['transformers_version'].startswith('5.') and provenance['created']
    assert manifest['weights_sha256'] == bundle_weights_sha256(tiny_bundle)
    assert not (tiny_bundle / 'draft').exists()
    backbone = {p.name for p in (tiny_bundle / 'backbone').iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= backbone
    assert not any(name.endswith(('.bin', '.pt', '.pth')) for name in backbone)


def test_weights_hash_covers_heads_and_backbone(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    original = bundle_weights_sha256(copy)
    heads = load_tensors(copy / 'heads.safetensors')
    heads['rfsq_head.proj.bias'][0] += 1e-3
    save_component(copy, 'heads', heads, json.loads((copy / 'heads.json').read_text()))
    changed_heads = bundle_weights_sha256(copy)
    backbone = load_tensors(copy / 'backbone' / 'model.safetensors')
    name = sorted(backbone)[0]
    backbone[name] = backbone[name] + 1
    save_component(copy / 'backbone', 'model', backbone, {})
    assert len({original, changed_heads, bundle_weights_sha256(copy)}) == 3


def test_build_is_deterministic_per_seed(action_tokenizer, tiny_bundle, tmp_path):
    again = build_main_bundle(tmp_path / 'again', 'tiny', action_tokenizer, seed=0)
    other = build_main_bundle(tmp_path / 'other', 'tiny', action_tokenizer, seed=1)
    hashes = [json.loads((d / 'manifest.json').read_text())['weights_sha256']
              for d in (tiny_bundle, again, other)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_build_refuses_bad_requests(action_tokenizer, tmp_path):
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match='not empty'):
        build_main_bundle(tmp_path / 'busy', 'tiny', action_tokenizer)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_main_bundle(tmp_path / 'new', 'huge', action_tokenizer)
    with pytest.raises(ValueError, match='3 action names for 7 action dims'):
        build_main_bundle(tmp_path / 'new2', 'tiny', action_tokenizer, action_names=['a'] * 3)
    assert (tmp_path / 'busy' / 'notes.txt').read_text() == 'keep me'


def backbone_on_meta(preset_name: str):
    """(LLaVA config, backbone with no storage) of a preset."""
    from transformers import LlavaForConditionalGeneration

    from rsd_core.processor import build_text_tokenizer

    config = bundle_build.llava_config(PRESETS[preset_name], build_text_tokenizer())
    with torch.device('meta'):
        return config, LlavaForConditionalGeneration(config)


def test_default_preset_sizes():
    assert PRESETS['default'].num_image_tokens == 64
    config, backbone = backbone_on_meta('default')
    hidden, codes = config.text_config.hidden_size, 128 * 7
    heads = hidden * codes + codes + codes * hidden + hidden + 8 * hidden
    params = sum(p.numel() for p in backbone.parameters()) + heads
    assert hidden == 384 and config.text_config.num_hidden_layers == 6
    assert 10e6 < params and params * 4 < 64e6


def test_small_preset_is_the_cheap_128_px_policy():
    preset = PRESETS['small']
    assert preset.image_size == 128 and preset.num_image_tokens == 64
    _, backbone = backbone_on_meta('small')
    params = sum(p.numel() for p in backbone.parameters())
    assert 2e6 < params < 8e6


def make_share_prefix(root: Path, with_model: bool) -> Path:
    (root / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (root / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'rsd_ros').touch()
    (root / 'share' / 'rsd_ros').mkdir()
    if with_model:
        (root / 'share' / 'rsd_ros' / 'models' / 'default').mkdir(parents=True)
        (root / 'share' / 'rsd_ros' / 'models' / 'default' / 'manifest.json').write_text('{}')
    return root


def test_default_bundle_dir_resolution(monkeypatch, tmp_path):
    repo_default = Path(bundle.__file__).resolve().parents[1] / 'models' / 'default'
    monkeypatch.delenv('RSD_MODEL_DIR', raising=False)
    monkeypatch.delenv('AMENT_PREFIX_PATH', raising=False)
    assert default_bundle_dir() == repo_default
    installed = make_share_prefix(tmp_path / 'installed', with_model=True)
    empty = make_share_prefix(tmp_path / 'empty', with_model=False)
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(empty))
    assert default_bundle_dir() == repo_default
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(installed))
    assert default_bundle_dir() == installed / 'share' / 'rsd_ros' / 'models' / 'default'
    monkeypatch.setenv('RSD_MODEL_DIR', str(tmp_path / 'mine'))
    assert default_bundle_dir() == tmp_path / 'mine'


def test_bundle_problems_name_what_is_missing(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    (copy / 'action_tokenizer' / 'action_tokenizer.json').unlink()
    (copy / 'backbone' / 'model.safetensors').unlink()
    problems = bundle_problems(copy)
    assert any('action_tokenizer.json: missing' in p for p in problems)
    assert any('no *.safetensors weights' in p for p in problems)
    assert 'bundle directory not found' in bundle_problems(tmp_path / 'nothing')[0]


def test_build_default_if_missing_keeps_a_complete_bundle(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    before = {p: p.stat().st_mtime_ns for p in copy.rglob('*')}
    assert rsd(['build-default', '--out', str(copy), '--if-missing']) == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob('*')} == before


def test_build_default_never_replaces_other_data(tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'cat.png').write_bytes(b'not a bundle')
    assert rsd(['build-default', '--out', str(tmp_path / 'photos'), '--if-missing']) == 1
    assert (tmp_path / 'photos' / 'cat.png').read_bytes() == b'not a bundle'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photos']


def test_build_default_never_replaces_trained_weights(tiny_bundle, tmp_path):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    manifest = json.loads((copy / 'manifest.json').read_text())
    manifest['provenance']['weights'] = policy.WEIGHTS
    (copy / 'manifest.json').write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in copy.rglob('*') if p.is_file()}
    assert rsd(['build-default', '--out', str(copy), '--preset', 'tiny', '--no-draft']) == 1
    assert {p: p.read_bytes() for p in copy.rglob('*') if p.is_file()} == before


@pytest.fixture
def one_torch_thread():
    """Tiny training jobs: on a busy 2-core machine a second thread only spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_build_default_rebuilds_an_incomplete_bundle_with_a_draft(tiny_bundle, tmp_path,
                                                                   one_torch_thread):
    from rsd_core.draft import DraftModel

    out = Path(shutil.copytree(tiny_bundle, tmp_path / 'bundle'))
    (out / 'heads.safetensors').unlink()
    assert rsd(['build-default', '--out', str(out), '--if-missing', '--preset', 'tiny',
                '--seed', '3', '--tokenizer-steps', '40', '--draft-samples', '8',
                '--draft-epochs', '1']) == 0
    assert bundle_problems(out) == []
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['provenance']['seed'] == 3
    assert manifest['weights_sha256'] == bundle_weights_sha256(out)
    draft = DraftModel.load(out / 'draft', main_hidden_size=manifest['hidden_size'],
                            main_weights_hash=manifest['weights_sha256'],
                            strict_provenance=True)
    assert draft is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bundle']


def test_a_flipped_bit_in_any_weight_file_is_refused_naming_the_file(tiny_bundle, tmp_path):
    import shutil

    from rsd_core.checkpoint import CheckpointError
    from rsd_core.main_model import MainModel

    copy = tmp_path / 'bundle'
    shutil.copytree(tiny_bundle, copy)
    MainModel.from_dir(copy)                                   # intact: loads
    weights = sorted((copy / 'backbone').glob('*.safetensors'))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=weights.name):
        MainModel.from_dir(copy)


def test_saved_weights_get_the_umask_permissions(tmp_path):
    """safetensors creates its files owner-only; an installed bundle must be readable by the
    user the node runs as."""
    umask = os.umask(0o022)
    try:
        weights = save_component(tmp_path / 'c', 'thing', {'w': torch.zeros(2)}, {'format': 'x'})
    finally:
        os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / 'c' / 'thing.json').stat().st_mode & 0o777 == 0o644
