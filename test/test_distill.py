"""Draft distillation: observation reading, augmentation, metrics, and a real distillation of
a draft from the tiny main bundle through `rsd train-draft`."""

import json
import logging

import numpy as np
import pytest
import torch

from rsd_core.draft import DraftModel
from rsd_core.main_model import MainModel
from rsd_core.observations import load_image, read_observations
from rsd_core.training.augmentation import (
    DISTILL_AUGMENTATION,
    augment_images,
    seeded_generator,
)
from rsd_core.training.distill import sample_plan
from rsd_core.training.draft_training import acceptance_metrics, split_by_source
from rsd_core.training.synthetic_observations import write_synthetic_observations
from rsd_ros.cli import main as rsd


def test_synthetic_observations_follow_the_format(tmp_path):
    directory = write_synthetic_observations(tmp_path / 'obs', count=5, seed=3)
    lines = [json.loads(line) for line in (directory / 'index.jsonl').read_text().splitlines()]
    assert len(lines) == 5
    assert {'image', 'instruction', 'suite', 'task_id', 'init_state', 'step'} <= set(lines[0])
    observations = read_observations(directory)
    image = load_image(observations[0].image)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert all(o.instruction and o.meta['suite'].startswith('libero_') for o in observations)


def test_reader_skips_or_refuses_bad_entries(tmp_path, caplog):
    directory = write_synthetic_observations(tmp_path / 'obs', count=3)
    with open(directory / 'index.jsonl', 'a') as index:
        index.write('{"image": "images/missing.png", "instruction": "turn on the stove"}\n')
        index.write('not json\n')
    with caplog.at_level(logging.WARNING, logger='rsd_core.observations'):
        assert len(read_observations(directory)) == 3
    assert any('index.jsonl:4' in r.getMessage() and 'missing.png' in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match=r'index.jsonl:4: .*missing.png not found'):
        read_observations(directory, strict=True)
    with pytest.raises(ValueError, match='no index.jsonl'):
        read_observations(tmp_path)


def augment(image: np.ndarray, seed: int) -> np.ndarray:
    """The distillation view of image [H, W, 3] uint8 for a seed."""
    views = augment_images(torch.from_numpy(image)[None], seeded_generator(seed),
                           **DISTILL_AUGMENTATION)
    return views[0].numpy()


def test_augment_keeps_shape_and_changes_pixels(tmp_path):
    directory = write_synthetic_observations(tmp_path / 'obs', count=1)
    image = load_image(read_observations_one(directory))
    first = augment(image, 1)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.abs(first.astype(int) - image).mean() > 2.0
    np.testing.assert_array_equal(first, augment(image, 1))
    assert not np.array_equal(first, augment(image, 2))
    wide = np.ascontiguousarray(np.concatenate([image, image[:, :64]], axis=1))  # [128, 192, 3]
    assert augment(wide, 1).shape == wide.shape


def read_observations_one(directory):
    return directory / json.loads((directory / 'index.jsonl').read_text().splitlines()[0])[
        'image']


def test_split_keeps_augmented_copies_together():
    plan = sample_plan(num_sources=10, samples=45, augment_images=True)
    assert plan[:10] == [(i, 0) for i in range(10)] and plan[10] == (0, 1)
    source = torch.tensor([s for s, _ in plan])
    train, held = split_by_source(source, 0.2, seed=0)
    assert len(train) + len(held) == 45
    assert not set(source[train].tolist()) & set(source[held].tolist())
    assert len(set(source[held].tolist())) == 2


def test_acceptance_metrics_count_whole_layers_and_prefixes():
    tokens = torch.zeros(4, 3, 128, dtype=torch.long)
    predicted = tokens.clone()
    predicted[0, 0, 5] = 1          # sample 0: layer 1 wrong in one code -> nothing accepted
    predicted[1, 1, :] = 2          # sample 1: layer 1 right, layer 2 wrong -> 1 accepted
    predicted[2, 2, 0] = 3          # sample 2: layers 1-2 right -> 2 accepted; sample 3: all 3
    metrics = acceptance_metrics(predicted, tokens)
    assert metrics['exact_match'] == [0.75, 0.75, 0.75]
    assert metrics['prefix_accept'] == [0.75, 0.5, 0.25]
    assert metrics['mean_accepted_layers'] == pytest.approx(1.5)
    assert metrics['token_accuracy'][1] == pytest.approx(1 - 128 / 512)


def test_train_draft_learns_the_tiny_main(tiny_bundle, tmp_path, capsys, caplog):
    """End to end through the CLI: record the tiny main's greedy tokens on augmented synthetic
    images, train the full-size draft, save it with provenance, reload it validated.

    The tiny main is random: its codes have small top-1/top-2 margins and layer l+1 follows
    layer l's discrete codes, so an h0-only draft cannot get whole layers (128 codes) right;
    exact-layer match stays near 0 for trained and untrained drafts alike (measured ~0.5% with
    2000 samples). What training must show: held-out loss falls, and per-layer token accuracy
    beats both the untrained draft and the best input-independent guess (the most frequent
    training code per position), which it can only do by reading h0 through its projection.
    The v2 draft reads the codes just decided and gets whole layers there (test_draft_v2).
    """
    observations = write_synthetic_observations(tmp_path / 'obs', count=60, seed=1)
    out = tmp_path / 'draft'
    status = rsd(['train-draft', '--kind', 'v1', '--model', str(tiny_bundle), '--observations',
                  str(observations), '--out', str(out), '--samples', '600', '--epochs', '30',
                  '--seed', '0', '--json'])
    assert status == 0
    metrics = json.loads(capsys.readouterr().out)
    held, untrained = metrics['held_out'], metrics['untrained_held_out']
    constant = metrics['constant_guess_held_out']
    assert metrics['held_out_samples'] >= 100 and metrics['train_samples'] >= 400
    assert held['loss'] < 0.5 * untrained['loss']
    for k in range(3):
        assert held['token_accuracy'][k] > untrained['token_accuracy'][k] + 0.5
        assert 0.0 <= held['exact_match'][k] <= 1.0
    # Measured: trained 0.949 0.954 0.961, constant guess 0.922 0.944 0.956; a draft that
    # ignores h0 learns exactly the constant guess.
    assert held['token_accuracy'][0] > constant['token_accuracy'][0] + 0.01
    assert np.mean(held['token_accuracy']) > np.mean(constant['token_accuracy']) + 0.005

    main = MainModel.from_dir(tiny_bundle)
    manifest = json.loads((out / 'draft.json').read_text())
    provenance = manifest['provenance']
    assert provenance['trained'] is True
    assert provenance['main_weights_sha256'] == main.weights_hash
    assert provenance['metrics']['held_out']['token_accuracy'] == held['token_accuracy']
    assert provenance['data']['samples'] == 600 and provenance['data']['augmented'] is True
    with caplog.at_level(logging.WARNING, logger='rsd_core.draft'):
        draft = DraftModel.load(out, main.hidden_size, main.weights_hash, strict_provenance=True)
    assert not caplog.records
    assert draft.num_proposals == 3
    assert draft.config.hidden_size == main.hidden_size == manifest['config']['hidden_size']
