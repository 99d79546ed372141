"""`rsd train-policy` on small synthetic demos in LIBERO's HDF5 layout (real h5py files, the real
tiny LLaVA, the real engine and draft distillation; no mocks).

In the demos the colour of the upper half of the (upright) image fixes the action: red moves +x,
green +y, blue +z with the gripper closed. The frames are stored upside down, as LIBERO stores
them, so the loader must rotate them back.
"""

import contextlib
import io
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rsd_core.bundle import bundle_problems, bundle_weights_sha256
from rsd_core.checkpoint import file_sha256, load_tensors
from rsd_core.cpu_features import cpu_flags, emulated_bfloat16
from rsd_core.engine import RSDEngine
from rsd_core.main_model import MainModel
from rsd_core.tokenizer import ActionTokenizer
from rsd_core.training.augmentation import augment_images
from rsd_core.training.demo_dataset import DemoData, encode_chunks
from rsd_core.training.demos import PROPRIO_NAMES, episode_chunks, read_episodes, split_episodes
from rsd_core.training.frames import FrameReader
from rsd_core.training.policy import train_policy
from rsd_core.training.policy_config import TrainPolicyConfig
from rsd_core.training.teacher_forcing import teacher_forced_logits
from rsd_core.training.train_state import checkpoint_dirs
from rsd_ros.cli import main as rsd

COLOURS = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 60, 220)}
ACTIONS = {'red': (0.8, 0, 0, 0, 0, 0, -1), 'green': (0, 0.8, 0, 0, 0, 0, -1),
           'blue': (0, 0, 0.8, 0, 0, 0, 1)}
LONG_TASK = 'pick up the black bowl and place it on the plate'
SHORT_TASK = 'open the top drawer'
LENGTH = 24


def upright_frame(colour: str, t: int, size: int = 32) -> np.ndarray:
    """The camera view: the cue colour above, grey below, a white marker moving with t."""
    image = np.full((size, size, 3), 128, np.uint8)
    image[:size // 2] = COLOURS[colour]
    x = t % (size - 4)
    image[size - 6:size - 2, x:x + 4] = 255
    return image


def write_demo_file(path: Path, instruction: str, colours: list[str], seed: int = 0,
                    length: int = LENGTH, states: list[float] | None = None) -> Path:
    """A LIBERO-layout demo file: data/demo_i/{actions, obs/agentview_rgb (upside down), ...}.

    states: per demo, the value of every arm joint in obs/joint_states (written only then)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, 'w') as stream:
        data = stream.create_group('data')
        data.attrs['problem_info'] = json.dumps({'language_instruction': instruction,
                                                 'problem_name': 'synthetic'})
        data.attrs['env_args'] = json.dumps({'env_name': 'synthetic'})
        data.attrs['num_demos'] = len(colours)
        data.attrs['total'] = len(colours) * length
        for i, colour in enumerate(colours):
            demo = data.create_group(f'demo_{i}')
            actions = np.tile(np.array(ACTIONS[colour], np.float32), (length, 1))
            actions[:, :6] += rng.normal(0, 0.03, (length, 6)).astype(np.float32)
            demo.create_dataset('actions', data=actions)
            raw = np.stack([upright_frame(colour, t)[::-1, ::-1] for t in range(length)])
            demo.create_dataset('obs/agentview_rgb', data=raw)
            demo.create_dataset('obs/ee_pos', data=np.zeros((length, 3), np.float32))
            demo.create_dataset('obs/gripper_states', data=np.zeros((length, 2), np.float32))
            if states is not None:
                joints = np.full((length, 7), states[i], np.float32)
                joints += rng.normal(0, 0.01, joints.shape).astype(np.float32)
                demo.create_dataset('obs/joint_states', data=joints)
    return path


@pytest.fixture(scope='module')
def demos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp('demos')
    colours = ['red', 'green', 'blue'] * 2
    return [write_demo_file(root / 'long.hdf5', LONG_TASK, colours, seed=0),
            write_demo_file(root / 'short.hdf5', SHORT_TASK, colours, seed=1)]


@pytest.fixture(scope='module')
def trained(demos, tmp_path_factory):
    """One CLI run on the tiny preset: tokenizer fitted here, 60 steps, draft distilled."""
    out = tmp_path_factory.mktemp('bc') / 'bundle'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = rsd(['train-policy', '--demos', *map(str, demos), '--out', str(out),
                    '--preset', 'tiny', '--tokenizer-steps', '60', '--steps', '60',
                    '--lr', '1e-3', '--eval-every', '20', '--save-every', '30',
                    '--heldout-fraction', '0.34', '--eval-samples', '64',
                    '--draft-observations', '16', '--draft-samples', '32',
                    '--draft-epochs', '2', '--no-progress', '--no-proprio', '--json'])
    assert code == 0
    return out, json.loads(printed.getvalue())


@pytest.fixture(scope='module')
def trained_on_state(tmp_path_factory):
    """The tiny preset trained with proprioception on demos whose images are all alike: only
    the joint states (+0.5 or -0.5) tell +x from +y."""
    root = tmp_path_factory.mktemp('state_demos')
    colours, states = ['red', 'green'] * 3, [0.5, -0.5] * 3
    demos = [write_demo_file(root / 'a.hdf5', LONG_TASK, colours, seed=2, states=states)]
    with h5py.File(demos[0], 'a') as stream:           # one grey picture for every frame
        for name in stream['data']:
            stream[f'data/{name}/obs/agentview_rgb'][...] = 128
    out = tmp_path_factory.mktemp('bc_state') / 'bundle'
    metrics = train_policy(TrainPolicyConfig(
        demos=[str(p) for p in demos], out=str(out), preset='tiny', tokenizer_steps=60,
        steps=150, lr=1e-3, eval_every=50, save_every=50, heldout_fraction=0.0,
        eval_samples=32, distill_draft=False, progress=False))
    return out, metrics


# ---------------------------------------------------------------- data

def test_reads_libero_layout_and_rotates_frames_upright(demos):
    episodes = read_episodes(demos)
    assert len(episodes) == 12 and {e.instruction for e in episodes} == {LONG_TASK, SHORT_TASK}
    assert all(e.actions.shape == (LENGTH, 7) and e.actions.dtype == np.float32
               for e in episodes)
    frames = FrameReader(episodes, image_size=64)
    try:
        for episode, colour in ((0, 'red'), (2, 'blue')):
            assert np.array_equal(frames.raw(episode, 5), upright_frame(colour, 5))
        resized = frames.frame(1, 3)
        assert resized.shape == (64, 64, 3) and resized.dtype == np.uint8
        assert tuple(resized[5, 5]) == COLOURS['green'] and tuple(resized[40, 40]) == (128,) * 3
        assert frames.frame(1, 3) is resized  # cached
    finally:
        frames.close()


def test_chunks_pad_with_the_last_action():
    actions = np.arange(10, dtype=np.float32)[:, None].repeat(7, 1)  # [10, 7]
    chunks = episode_chunks(actions, 8)
    assert chunks.shape == (10, 8, 7)
    assert chunks[0, :, 0].tolist() == list(range(8))
    assert chunks[7, :, 0].tolist() == [7, 8, 9, 9, 9, 9, 9, 9]
    assert chunks[9, :, 0].tolist() == [9] * 8


def test_samples_start_only_at_labelled_steps(demos, tiny_bundle, tmp_path):
    """A DART demo's steps inside a perturbed chunk start no sample, but their actions are
    still the later points of earlier samples' chunks."""
    path = write_demo_file(tmp_path / 'dart.hdf5', LONG_TASK, ['red', 'green'])
    marks = np.ones(LENGTH, np.uint8)
    marks[9:16] = 0                                   # chunk 8..15 perturbed after its start
    with h5py.File(path, 'a') as stream:
        stream['data/demo_1'].create_dataset('labelled', data=marks)
    episodes = read_episodes([path])
    assert episodes[0].labelled is None
    assert episodes[1].labelled.tolist() == marks.astype(bool).tolist()
    model = MainModel.from_dir(tiny_bundle)
    tokenizer = ActionTokenizer.load(tiny_bundle / 'action_tokenizer')
    frames = FrameReader(episodes, model.processor.image_size)
    try:
        data = DemoData(episodes, model, tokenizer, frames)
    finally:
        frames.close()
    assert len(data) == 2 * LENGTH - 7
    assert data.t[data.episode == 1].tolist() == [t for t in range(LENGTH) if marks[t]]
    start = np.flatnonzero((data.episode == 1) & (data.t == 8))[0]
    assert np.array_equal(data.chunks[start], episodes[1].actions[8:16])
    before = np.flatnonzero((data.episode == 1) & (data.t == 5))[0]
    assert np.array_equal(data.chunks[before], episodes[1].actions[5:13])
    assert data.codes.shape[0] == len(data)
    for i in (before, start, len(data) - 1):   # each sample's own targets (the coarse layers:
        alone = encode_chunks(tokenizer, data.chunks[i:i + 1])[0]   # fine ones are at rounding)
        assert np.array_equal(data.codes[i, :2], alone[:2])


def test_held_out_split_is_by_episode_and_per_task(demos):
    episodes = read_episodes(demos)
    train, held = split_episodes(episodes, 0.34, seed=0)
    assert sorted(train + held) == list(range(12)) and not set(train) & set(held)
    per_task = [sum(episodes[i].instruction == task for i in held)
                for task in (LONG_TASK, SHORT_TASK)]
    assert per_task == [2, 2]
    assert split_episodes(episodes, 0.34, seed=0) == (train, held)
    assert split_episodes(episodes, 0.0, seed=0) == (list(range(12)), [])


def test_augmentation_is_seeded_and_keeps_the_cue():
    images = torch.from_numpy(np.stack([upright_frame('red', 3, 64)] * 4))  # [4, 64, 64, 3]
    first = augment_images(images, torch.Generator().manual_seed(1))
    again = augment_images(images, torch.Generator().manual_seed(1))
    other = augment_images(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each image draws its own crop and jitter
    top = first[:, :16].float().mean(dim=(1, 2))  # [4, 3]
    assert (top[:, 0] > top[:, 1] + 60).all() and (top[:, 0] > top[:, 2] + 60).all()


def test_teacher_forcing_is_the_engine_decoding(tiny_bundle):
    """One causal forward over [prompt, layers 0..6] gives the logits of prefill +
    forward_layers: what the head is trained on is what greedy decoding reads."""
    model = MainModel.from_dir(tiny_bundle, dtype=torch.float64)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    inputs = model.processor(images, [SHORT_TASK] * 3)
    codes = torch.randint(0, model.levels, (3, model.num_layers, model.codes_per_layer),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = teacher_forced_logits(model, inputs, codes)  # [3, L, C, V]
        cache, _, layer0 = model.prefill(inputs)
        rest, _ = model.forward_layers(cache, codes[:, :-1], first_layer=0)
    assert logits.shape == (3, model.num_layers, model.codes_per_layer, model.levels)
    assert torch.allclose(logits, torch.cat([layer0[:, None], rest], 1), atol=1e-10)


# ---------------------------------------------------------------- training through the CLI

def test_training_learns_the_colour_cue(trained):
    _, metrics = trained
    history = metrics['history']
    assert [h['step'] for h in history] == [20, 40, 60]
    assert history[-1]['train_loss'] < history[0]['train_loss'] - 0.05
    assert history[-1]['held_out']['loss'] < history[0]['held_out']['loss']
    held, base = history[-1]['held_out'], metrics['baselines']
    assert metrics['held_out_episodes'] == 4 and held['samples'] == 64
    # Layer 0 beats chance (1/7) and the constant most-frequent-code guess clearly.
    assert held['token_accuracy'][0] > max(0.3, base['constant_guess_accuracy'][0] + 0.1)
    assert held['action_l1'] < 0.6 * base['mean_chunk_l1']
    assert metrics['seconds_per_step'] > 0


def test_bundle_loads_and_the_engine_follows_the_cue(trained, demos):
    out, metrics = trained
    assert bundle_problems(out) == []
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['weights_sha256'] == bundle_weights_sha256(out) == metrics['weights_sha256']
    provenance = manifest['provenance']
    assert provenance['preset'] == 'tiny' and provenance['seed'] == 0
    assert provenance['training']['steps'] == 60
    assert [d['sha256'] for d in provenance['demos']] == [file_sha256(p) for p in demos]
    assert provenance['metrics']['final']['held_out']['token_accuracy'] == \
        metrics['final']['held_out']['token_accuracy']
    model = MainModel.from_dir(out)
    assert model.weights_hash == manifest['weights_sha256']
    engine = RSDEngine.from_dirs(out, draft_dir='')
    for colour, axis in (('red', 0), ('green', 1), ('blue', 2)):
        actions, _ = engine.predict(upright_frame(colour, 7), SHORT_TASK)
        assert actions.shape == (8, 7) and actions.dtype == np.float32
        assert int(np.argmax(actions[:, :3].mean(0))) == axis, (colour, actions.mean(0))


def test_draft_is_distilled_from_the_trained_model(trained):
    out, metrics = trained
    draft_manifest = json.loads((out / 'draft' / 'draft.json').read_text())
    assert draft_manifest['provenance']['main_weights_sha256'] == metrics['weights_sha256']
    assert draft_manifest['kind'] == 'v2'           # train-policy distils v2 unless told
    assert metrics['draft']['held_out_samples'] >= 1
    engine = RSDEngine.from_dirs(out)  # the bundle's draft
    actions, stats = engine.predict(upright_frame('blue', 2), LONG_TASK, use_draft=True)
    assert actions.shape == (8, 7) and stats.used_draft
    assert stats.layers_proposed >= 3 and stats.rounds >= 1         # K = 3 a round, rolling


def test_proprioception_is_learned_from_the_joint_states(trained_on_state):
    out, _ = trained_on_state
    engine = RSDEngine.from_dirs(out, draft_dir='')
    assert engine.proprio_names == PROPRIO_NAMES
    grey = np.full((32, 32, 3), 128, np.uint8)
    for value, axis in ((0.5, 0), (-0.5, 1)):
        state = np.array([value] * 7 + [0.0, 0.0], np.float32)
        actions, _ = engine.predict(grey, LONG_TASK, proprio=state)
        assert int(np.argmax(actions[:, :3].mean(0))) == axis, (value, actions.mean(0))
    with pytest.raises(ValueError, match='takes proprioception'):
        engine.predict(grey, LONG_TASK)


def test_proprioception_needs_the_state_datasets(demos, tmp_path):
    with pytest.raises(ValueError, match=r'no obs/joint_states dataset .*--no-proprio'):
        read_episodes(demos, proprio=True)
    with pytest.raises(ValueError, match='no obs/joint_states'):
        train_policy(TrainPolicyConfig(demos=[str(demos[0])], out=str(tmp_path / 'o'),
                                       preset='tiny', progress=False))


# ---------------------------------------------------------------- resume and fine-tuning

def config(demos, out, init, **changes) -> TrainPolicyConfig:
    settings = dict(demos=[str(p) for p in demos], out=str(out), init=str(init),
                    tokenizer=str(init / 'action_tokenizer'), steps=12, lr=1e-3,
                    batch_size=8, eval_every=6, save_every=5, eval_samples=16,
                    heldout_fraction=0.2, distill_draft=False, progress=False, proprio=False)
    return TrainPolicyConfig(**{**settings, **changes})


def test_resume_continues_with_identical_state(demos, tiny_bundle, tmp_path, caplog):
    straight = train_policy(config(demos, tmp_path / 'straight', tiny_bundle))
    stopped = train_policy(config(demos, tmp_path / 'resumed', tiny_bundle, stop_after=7))
    assert stopped['stopped'] and stopped['steps'] == 7
    assert not (tmp_path / 'resumed' / 'manifest.json').exists()
    assert [p.name for p in checkpoint_dirs(tmp_path / 'resumed')] == ['step-00000007']
    with caplog.at_level(logging.INFO, logger='rsd_core.training.policy'):
        resumed = train_policy(config(demos, tmp_path / 'resumed', tiny_bundle, resume=True))
    assert 'resumed from' in caplog.text and 'at step 7' in caplog.text
    assert resumed['steps'] == straight['steps'] == 12
    assert resumed['weights_sha256'] == straight['weights_sha256']
    for name in ('model', 'optimizer'):
        a, b = (load_tensors(checkpoint_dirs(tmp_path / run)[-1] / f'{name}.safetensors')
                for run in ('straight', 'resumed'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / 'straight' / 'manifest.json').read_text())
    assert manifest['provenance']['init'] == str(tiny_bundle.resolve())
    assert manifest['hidden_size'] == 64
    init_hash = json.loads((tiny_bundle / 'manifest.json').read_text())['weights_sha256']
    assert manifest['provenance']['init_weights_sha256'] == init_hash != manifest['weights_sha256']
    with pytest.raises(ValueError, match='cannot resume.*seed 0 -> 1'):
        train_policy(config(demos, tmp_path / 'resumed', tiny_bundle, resume=True, seed=1))


def test_fine_tuning_flags_freeze_vision_accumulate_and_autocast(demos, tiny_bundle, tmp_path,
                                                                 caplog):
    """The large-backbone flags, on the tiny model: frozen vision tower, gradient
    checkpointing, two micro-batches per step, bfloat16 autocast (with a warning where this
    CPU emulates bfloat16)."""
    out = tmp_path / 'frozen'
    with caplog.at_level(logging.WARNING, logger='rsd_core'):
        metrics = train_policy(config(demos, out, tiny_bundle, steps=3, freeze_vision=True,
                                      gradient_checkpointing=True, grad_accum=2,
                                      dtype='bfloat16'))
    assert metrics['steps'] == 3 and np.isfinite(metrics['final']['train_loss'])
    emulated = emulated_bfloat16(torch.device('cpu'), torch.bfloat16)
    assert ('bfloat16 is emulated' in caplog.text) == emulated
    before = load_tensors(tiny_bundle / 'backbone' / 'model.safetensors')
    after = load_tensors(out / 'backbone' / 'model.safetensors')
    vision = [k for k in before if 'vision_tower' in k]
    language = [k for k in before if 'language_model' in k and '.layers.' in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert language and all(not torch.equal(before[k], after[k]) for k in language)
    saved = load_tensors(checkpoint_dirs(out)[-1] / 'model.safetensors')
    assert not any('vision_tower' in k for k in saved)


def test_bfloat16_on_a_cpu_without_native_support_is_flagged(tmp_path):
    """Emulated bfloat16 is named from the cpuinfo flags; float32, CUDA and unknown flags are
    never flagged."""
    avx2 = tmp_path / 'avx2'
    avx2.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n')
    amx = tmp_path / 'amx'
    amx.write_text('flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n')
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert cpu_flags(avx2) == {'fpu', 'sse2', 'avx2', 'fma'}
    assert cpu_flags(tmp_path / 'missing') is None
    assert emulated_bfloat16(cpu, torch.bfloat16, avx2)
    assert not emulated_bfloat16(cpu, torch.bfloat16, amx)
    assert not emulated_bfloat16(cpu, torch.float32, avx2)
    assert not emulated_bfloat16(cuda, torch.bfloat16, avx2)
    assert not emulated_bfloat16(cpu, torch.bfloat16, tmp_path / 'missing')


def test_refuses_to_overwrite_an_output_directory(demos, tiny_bundle, tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='not empty; continue a run with --resume'):
        train_policy(config(demos, tmp_path / 'out', tiny_bundle))
    assert (tmp_path / 'out' / 'notes.txt').read_text() == 'mine'
    with pytest.raises(ValueError, match='holds a bundle but no training checkpoint'):
        train_policy(config(demos, tiny_bundle, tiny_bundle, resume=True))
    assert bundle_problems(tiny_bundle) == []


def test_cli_refuses_init_with_preset(demos, tiny_bundle, tmp_path, caplog):
    code = rsd(['train-policy', '--demos', str(demos[0]), '--out', str(tmp_path / 'o'),
                '--init', str(tiny_bundle), '--preset', 'tiny'])
    assert code == 1 and 'give one of them' in caplog.text


# ---------------------------------------------------------------- bad demo files

def broken(path: Path, edit) -> Path:
    write_demo_file(path, SHORT_TASK, ['red', 'blue'], length=10)
    with h5py.File(path, 'a') as stream:
        edit(stream)
    return path


@pytest.mark.parametrize('edit, message', [
    (lambda f: f['data'].attrs.__delitem__('problem_info'), 'no "problem_info" attribute'),
    (lambda f: f['data'].attrs.__setitem__('problem_info', '{"x": 1}'),
     'problem_info is not JSON with "language_instruction"'),
    (lambda f: f['data/demo_1/obs'].__delitem__('agentview_rgb'),
     r'data/demo_1 has no obs/agentview_rgb'),
    (lambda f: f['data/demo_0'].__delitem__('actions'), 'data/demo_0 has no "actions"'),
    (lambda f: (f['data/demo_0'].__delitem__('actions'),
                f['data/demo_0'].create_dataset('actions', data=np.zeros((9, 7)))),
     '10 frames but 9 actions'),
    (lambda f: (f['data/demo_0'].__delitem__('actions'),
                f['data/demo_0'].create_dataset('actions', data=np.zeros((10, 6)))),
     r'actions has shape \[10, 6\], expected \[N >= 1, 7\]'),
    (lambda f: f['data/demo_1/actions'].__setitem__((3, 2), np.nan), 'NaN or Inf'),
    (lambda f: [f['data'].__delitem__(k) for k in list(f['data'])], 'no data/demo_<i> groups'),
    (lambda f: f['data/demo_0'].create_dataset('labelled', data=np.ones(9, np.uint8)),
     r'labelled has shape \[9\], expected \[10\]'),
    (lambda f: f['data/demo_0'].create_dataset('labelled', data=np.zeros(10, np.uint8)),
     'labelled is 0 at step 0'),
    (lambda f: f['data/demo_1'].attrs.__setitem__('action_noise', [0.1, 0.03]),
     'collected with action noise but has no "labelled" marks'),
])
def test_malformed_demo_files_give_clear_errors(tmp_path, edit, message):
    path = broken(tmp_path / 'demo.hdf5', edit)
    with pytest.raises(ValueError, match=message):
        read_episodes([path])


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, demos, caplog):
    with pytest.raises(ValueError, match='no such demo file or directory'):
        read_episodes([tmp_path / 'absent.hdf5'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='holds no .hdf5 / .h5 demo files'):
        read_episodes([tmp_path / 'empty'])
    corrupt = tmp_path / 'corrupt.hdf5'
    corrupt.write_bytes(b'not an hdf5 file at all' * 10)
    with pytest.raises(ValueError, match='not a readable HDF5 file'):
        read_episodes([demos[0], corrupt])
    with h5py.File(tmp_path / 'other.hdf5', 'w') as stream:
        stream.create_dataset('x', data=np.zeros(3))
    with pytest.raises(ValueError, match='no "data" group'):
        read_episodes([tmp_path / 'other.hdf5'])
    code = rsd(['train-policy', '--demos', str(corrupt), '--out', str(tmp_path / 'o'),
                '--preset', 'tiny', '--no-progress'])
    assert code == 1 and 'not a readable HDF5 file' in caplog.text
    assert not (tmp_path / 'o').exists()
