"""`rsd collect-demos`: LIBERO's HDF5 layout, only successful episodes kept, resumable."""

import argparse
import json

import h5py
import numpy as np
import pytest

from sim_bridge import collect_demos
from sim_bridge.collect_demos import collect_task, demo_path, open_demo_file, quat_to_axis_angle
from sim_bridge.expert import SpatialExpert, resolve_goal


@pytest.fixture(scope='module')
def libero_task():
    from sim_bridge.libero_env import LiberoTask

    with LiberoTask('libero_spatial', task_id=0, camera_size=32) as task:
        yield task


def test_quat_to_axis_angle_matches_robosuite():
    from robosuite.utils.transform_utils import quat2axisangle

    rng = np.random.default_rng(0)
    for quat in [np.array([1.0, 0, 0, 0]), np.array([0, 0, 0, 1.0]), *rng.normal(size=(20, 4))]:
        quat = quat / np.linalg.norm(quat)
        assert np.allclose(quat_to_axis_angle(quat), quat2axisangle(quat.copy()), atol=1e-7)


def test_a_failed_episode_is_not_kept(libero_task, tmp_path):
    summary = collect_task(libero_task, [0], tmp_path, max_steps=20, resume=False, seed=0)
    assert (summary.kept, summary.failed) == (0, 1)
    with h5py.File(demo_path(tmp_path, libero_task)) as hdf5:
        assert len(hdf5['data']) == 0
        assert hdf5['data'].attrs['num_demos'] == 0
        assert json.loads(hdf5['data'].attrs['problem_info'])['language_instruction'] == \
            libero_task.language


def test_a_successful_episode_in_libero_layout_and_resume(libero_task, tmp_path):
    from sim_bridge.libero_env import rotate_180

    summary = collect_task(libero_task, [0], tmp_path, max_steps=0, resume=False, seed=0)
    assert (summary.kept, summary.failed) == (1, 0)
    path = demo_path(tmp_path, libero_task)
    assert path.name == f'{libero_task.task_name}_demo.hdf5'
    with h5py.File(path) as hdf5:
        data = hdf5['data']
        assert list(data) == ['demo_0']
        demo = data['demo_0']
        n = demo['actions'].shape[0]
        assert 40 < n <= libero_task.horizon
        assert demo.attrs['num_samples'] == n and demo.attrs['init_state_index'] == 0
        assert list(demo.attrs['action_noise']) == [0.0, 0.0, 0.0]
        assert data.attrs['num_demos'] == 1 and data.attrs['total'] == n
        obs = demo['obs']
        shapes = {key: obs[key].shape for key in obs}
        assert shapes == {'agentview_rgb': (n, 32, 32, 3), 'ee_pos': (n, 3), 'ee_ori': (n, 3),
                          'ee_states': (n, 6), 'gripper_states': (n, 2),
                          'joint_states': (n, 7)}
        assert obs['agentview_rgb'].dtype == np.uint8
        assert demo['actions'].dtype == np.float32
        actions = demo['actions'][()]
        assert np.abs(actions).max() <= 1.0 and (actions[:, 6] == 1.0).any()
        for key in ('dones', 'rewards'):
            assert demo[key][()].tolist() == [0] * (n - 1) + [1]
        problem = json.loads(data.attrs['problem_info'])
        assert problem['language_instruction'] == libero_task.language
        assert json.loads(data.attrs['env_args'])['env_kwargs']['controller'] == 'OSC_POSE'
        assert '(:goal' in data.attrs['bddl_file_content']
        assert np.array_equal(demo.attrs['init_state'], libero_task.init_states[0])
        first_image = obs['agentview_rgb'][0]
        first_pos = obs['ee_pos'][0]
    # The first sample is the settled initial view, in LIBERO's raw (upside-down) orientation.
    observation = libero_task.reset(0)
    assert np.array_equal(first_image, rotate_180(observation.image))
    assert np.allclose(first_pos, observation.robot.eef_pos)

    again = collect_task(libero_task, [0], tmp_path, max_steps=0, resume=True, seed=0)
    assert (again.kept, again.failed, again.skipped) == (0, 0, 1)
    with h5py.File(path) as hdf5:
        assert list(hdf5['data']) == ['demo_0']


def test_resume_drops_an_incomplete_demo(libero_task, tmp_path):
    path = demo_path(tmp_path, libero_task)
    hdf5, kept = open_demo_file(path, libero_task, resume=False)
    hdf5['data'].create_group('demo_0').create_dataset('actions', data=np.zeros((3, 7)))
    hdf5.close()
    hdf5, kept = open_demo_file(path, libero_task, resume=True)
    try:
        assert kept == set() and len(hdf5['data']) == 0
    finally:
        hdf5.close()


def test_action_noise_offsets_are_per_chunk_reproducible_and_spare_the_gripper():
    noise = collect_demos.ActionNoise(translation=0.1, rotation=0.03, seed=0)
    rng = noise.generator(3)
    offsets = np.stack([noise.offset(rng) for _ in range(2000)])        # [N, 7]
    assert np.array_equal(offsets[0], noise.offset(noise.generator(3)))
    assert not np.array_equal(offsets[0], noise.offset(noise.generator(4)))
    assert np.all(offsets[:, 6] == 0.0)
    assert np.allclose(offsets[:, :6].std(axis=0), [0.1] * 3 + [0.03] * 3, rtol=0.08)
    assert not collect_demos.ActionNoise().offset(rng).any()
    half = collect_demos.ActionNoise(translation=0.1, fraction=0.5, seed=0)
    rng = half.generator(3)
    perturbed = np.stack([half.offset(rng) for _ in range(2000)]).any(axis=1)   # [N]
    assert 0.45 < perturbed.mean() < 0.55


def test_action_noise_moves_the_hand_but_records_the_experts_actions(libero_task):
    """The first chunk is decided on the same initial state, so its recorded actions are the
    clean run's; executing them with an offset puts the hand elsewhere by the next chunk. Only
    a perturbed chunk's first step is labelled, and the expert does not learn the offset as
    drift."""
    goal = resolve_goal(libero_task.language)
    rollout = collect_demos.rollout
    clean = rollout(libero_task, SpatialExpert(goal), 0, max_steps=24, images=False)
    expert = SpatialExpert(goal)
    noisy = rollout(libero_task, expert, 0, max_steps=16, images=False,
                    noise=collect_demos.ActionNoise(translation=0.3, seed=0))
    assert np.array_equal(np.stack(noisy.actions[:8]), np.stack(clean.actions[:8]))
    moved = np.abs(np.stack(noisy.ee_pos[8:]) - np.stack(clean.ee_pos[8:16])).max()
    assert moved > 0.005, f'hand {moved * 1000:.1f} mm from the clean run'
    assert np.abs(np.stack(noisy.actions)).max() <= 1.0
    assert clean.labelled == [True] * 24
    assert noisy.labelled == ([True] + [False] * 7) * 2
    assert expert._predicted is None      # both chunks perturbed: no drift learnt from them
    assert not expert._drift.any()


def test_half_of_the_chunks_perturbed_are_written_as_labels(libero_task, tmp_path):
    noise = collect_demos.ActionNoise(translation=0.1, rotation=0.03, fraction=0.5, seed=0)
    summary = collect_task(libero_task, [1], tmp_path, max_steps=0, resume=False, seed=0,
                           images=False, noise=noise)
    assert summary.kept == 1
    with h5py.File(demo_path(tmp_path, libero_task)) as hdf5:
        demo = hdf5['data/demo_0']
        marks = demo['labelled'][()]
        assert marks.shape == demo['actions'].shape[:1] and marks.dtype == np.uint8
        assert list(demo.attrs['action_noise']) == pytest.approx([0.1, 0.03, 0.5])
    chunks = marks[:len(marks) // 8 * 8].reshape(-1, 8)             # [chunks, 8]
    assert chunks[:, 0].all()
    assert set(chunks[:, 1:].min(axis=1)) == {0, 1}                 # some perturbed, some not
    assert (chunks[:, 1:] == chunks[:, 1:2]).all()                  # a chunk is one or the other


def test_bad_arguments_are_refused(tmp_path):
    parser = argparse.ArgumentParser()
    collect_demos.add_arguments(parser)
    args = parser.parse_args(['--tasks', '12', '--out', str(tmp_path)])
    with pytest.raises(ValueError, match='out of range'):
        collect_demos.check_args(args)
    assert collect_demos.run(args) == 2
    args = parser.parse_args(['--out', str(tmp_path), '--action-noise', '-0.1'])
    with pytest.raises(ValueError, match='action-noise'):
        collect_demos.check_args(args)
    args = parser.parse_args(['--out', str(tmp_path), '--noise-fraction', '0'])
    with pytest.raises(ValueError, match='noise-fraction'):
        collect_demos.check_args(args)
    args = parser.parse_args(['--out', str(tmp_path), '--camera-size', '4'])
    with pytest.raises(ValueError, match='camera-size'):
        collect_demos.check_args(args)
