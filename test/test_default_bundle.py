"""The committed default bundle (models/default): a trained policy with its distilled draft."""

import json

import numpy as np
import pytest

from rsd_core.bundle import REPO_ROOT, bundle_weights_sha256
from rsd_core.observations import load_image, read_observations
from rsd_core.training.demos import PROPRIO_NAMES
from rsd_core.training.policy import WEIGHTS
from rsd_ros.cli import main as rsd

DEFAULT = REPO_ROOT / 'models' / 'default'
OBSERVATIONS = REPO_ROOT / 'data' / 'observations' / 'libero_spatial'


def test_default_bundle_is_trained_and_strictly_usable(capsys):
    assert rsd(['inspect', str(DEFAULT), '--strict', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['usable'] and not report['warnings']
    manifest = json.loads((DEFAULT / 'manifest.json').read_text())
    assert manifest['provenance']['weights'] == WEIGHTS
    assert manifest['weights_sha256'] == bundle_weights_sha256(DEFAULT)
    draft = json.loads((DEFAULT / 'draft' / 'draft.json').read_text())
    assert draft['provenance']['main_weights_sha256'] == manifest['weights_sha256']
    assert not (DEFAULT / 'checkpoint').exists(), 'training checkpoints do not belong in git'


@pytest.fixture(scope='module')
def engine():
    from rsd_core.engine import RSDEngine

    return RSDEngine.from_dirs(DEFAULT, acceptance='exact')


def observations(step: int) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """The recorded libero_spatial frames at one episode step (0: the initial state), with the
    instruction and the robot state."""
    return [(load_image(o.image), o.instruction, o.proprio)
            for o in read_observations(OBSERVATIONS) if o.meta['step'] == step]


def test_default_policy_takes_the_libero_robot_state(engine):
    assert engine.proprio_names == PROPRIO_NAMES
    assert all(len(proprio) == len(engine.proprio_names) for _, _, proprio in observations(0))


def test_default_policy_acts_and_exact_speculation_changes_nothing(engine):
    for image, instruction, proprio in observations(0)[::25]:
        main_only, _ = engine.predict(image, instruction, use_draft=False, proprio=proprio)
        speculative, stats = engine.predict(image, instruction, use_draft=True, proprio=proprio)
        assert main_only.shape == (8, 7) and np.isfinite(main_only).all()
        np.testing.assert_array_equal(speculative, main_only)
        assert stats.main_passes <= 8


def test_default_policy_starts_like_the_expert(engine):
    """From an initial state the expert moves towards the bowl with the gripper open
    (gripper -1): the trained policy does too, on every task; random weights do not."""
    for image, instruction, proprio in observations(0)[::10]:
        actions, _ = engine.predict(image, instruction, use_draft=False, proprio=proprio)
        assert (actions[:, 6] < 0).all(), instruction
