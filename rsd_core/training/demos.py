"""LIBERO HDF5 demonstrations: finding the files, validated actions, episodes, action chunks.

LIBERO's layout (docs/ARCHITECTURE.md, "Demonstration datasets"): `data/demo_<i>/actions`
[N, A] float and `data/demo_<i>/obs/<camera>` frames, with the task language in
`data.attrs['problem_info']`; `obs/joint_states` [N, 7] and `obs/gripper_states` [N, 2] are the
robot state. `rsd train-tokenizer` and `rsd refit-decoder` read actions only (`episode_actions`);
`rsd train-policy` reads episodes (`read_episodes`: actions, language, robot state; frames
stay on disk, see `rsd_core.training.frames`).
"""

from collections import defaultdict
from dataclasses import dataclass
import json
import logging
from pathlib import Path

import h5py
import numpy as np

from rsd_core.checkpoint import file_sha256

logger = logging.getLogger(__name__)

CAMERA = 'agentview_rgb'
# Proprioception: LIBERO's obs datasets, concatenated, and the names of their values as the
# robot's JointState (and so the sim bridge's joint_states) carries them.
PROPRIO_DATASETS = ('joint_states', 'gripper_states')
PROPRIO_NAMES = tuple(f'robot0_joint{i}' for i in range(1, 8)) + \
    ('gripper0_finger_joint1', 'gripper0_finger_joint2')


def find_demo_files(paths: list[str | Path]) -> list[Path]:
    """HDF5 files given directly or found (*.hdf5, *.h5) in given directories."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in ('.hdf5', '.h5'))
            if not found:
                raise ValueError(f'{path}: directory holds no .hdf5 / .h5 demo files')
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f'{path}: no such demo file or directory')
    return files


def open_demo_file(path: Path) -> h5py.File:
    """Open a demo file read-only (ValueError naming the file when it is not HDF5)."""
    try:
        return h5py.File(path, 'r')
    except OSError as exc:
        raise ValueError(f'{path}: not a readable HDF5 file ({exc}); expected a LIBERO demo '
                         'file (data/demo_<i>/actions, obs/agentview_rgb)') from exc


def demo_groups(path: Path, stream: h5py.File, layout: str) -> tuple[h5py.Group, list[str]]:
    """The `data` group of an open demo file and its `demo_<i>` names in numeric order
    (demo_2 before demo_10). layout: what the caller expects, for the error message."""
    data = stream.get('data')
    if not isinstance(data, h5py.Group):
        raise ValueError(f'{path}: no "data" group (expected LIBERO layout {layout})')
    names = sorted((k for k in data if k.startswith('demo_')), key=lambda k: (len(k), k))
    if not names:
        raise ValueError(f'{path}: no data/demo_<i> groups')
    return data, names


def read_actions(where: str, group: h5py.Group, action_dim: int) -> np.ndarray:
    """The validated `actions` [N >= 1, action_dim] float32 (action units) of one demo group;
    `where` names the group in error messages."""
    if 'actions' not in group:
        raise ValueError(f'{where} has no "actions" dataset')
    actions = np.asarray(group['actions'], dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != action_dim or not len(actions):
        raise ValueError(f'{where}/actions has shape {list(actions.shape)}, expected '
                         f'[N >= 1, {action_dim}]')
    if not np.isfinite(actions).all():
        raise ValueError(f'{where}/actions holds NaN or Inf')
    return actions


def episode_actions(path: Path, action_dim: int) -> list[np.ndarray]:
    """The validated `data/demo_<i>/actions` arrays [N, action_dim] of one file, in demo
    order (frames and language are not read)."""
    with open_demo_file(path) as stream:
        data, names = demo_groups(path, stream, 'data/demo_<i>/actions')
        return [read_actions(f'{path}: data/{name}', data[name], action_dim) for name in names]


def episode_chunks(actions: np.ndarray, chunk_len: int) -> np.ndarray:
    """Actions [N, A] -> chunks [N, chunk_len, A]: chunk t = steps t..t+chunk_len-1, padded
    with the last action past the episode end (stride 1: an episode of N steps gives N)."""
    padded = np.concatenate([actions, np.repeat(actions[-1:], chunk_len - 1, axis=0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, chunk_len, axis=0)  # [N, A, T]
    return np.ascontiguousarray(windows.transpose(0, 2, 1))  # [N, T, A]


# ---------------------------------------------------------------- episodes

@dataclass
class Episode:
    """One `data/demo_<i>` group: actions in memory, frames read lazily."""

    file: Path
    demo: str
    instruction: str
    actions: np.ndarray                 # [N, A] float32, action units
    proprio: np.ndarray | None = None   # [N, P] float32, PROPRIO_DATASETS concatenated
    labelled: np.ndarray | None = None  # [N] bool, where a sample may start (None: everywhere)

    @property
    def length(self) -> int:
        """N, the number of steps (actions) in the episode."""
        return len(self.actions)


def _instruction(path: Path, data: h5py.Group) -> str:
    """The task language in `data.attrs['problem_info']` (JSON, LIBERO's layout)."""
    raw = data.attrs.get('problem_info')
    if raw is None:
        raise ValueError(f'{path}: data has no "problem_info" attribute (expected JSON with '
                         '"language_instruction", as LIBERO writes it)')
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        language = info['language_instruction']
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f'{path}: problem_info is not JSON with "language_instruction" '
                         f'({type(exc).__name__}: {exc})') from exc
    # LIBERO's own loader joins it: some files store the sentence as a list of pieces.
    text = ''.join(language) if isinstance(language, list) else str(language)
    if not text.strip():
        raise ValueError(f'{path}: problem_info language_instruction is empty')
    return text.strip()


def read_episodes(paths: list[str | Path], action_dim: int = 7,
                  proprio: bool = False) -> list[Episode]:
    """Validate LIBERO HDF5 demo files and read their actions, instructions and (proprio) the
    robot state of PROPRIO_DATASETS (no frames).

    Raises ValueError naming the file and what is wrong: unreadable, missing groups or
    datasets, wrong shapes, frame count != action count, NaN actions or states, no instruction.
    """
    episodes = []
    for path in find_demo_files(paths):
        with open_demo_file(path) as stream:
            data, names = demo_groups(path, stream,
                                      'data/demo_<i>/{actions, obs/agentview_rgb}')
            instruction = _instruction(path, data)
            for name in names:
                episodes.append(_read_episode(path, data[name], name, instruction, action_dim,
                                              proprio))
    logger.info('%d episodes, %d frames from %d file(s)', len(episodes),
                sum(e.length for e in episodes), len({e.file for e in episodes}))
    return episodes


def _read_episode(path: Path, group: h5py.Group, name: str, instruction: str,
                  action_dim: int, proprio: bool) -> Episode:
    where = f'{path}: data/{name}'
    actions = read_actions(where, group, action_dim)
    frames = group.get(f'obs/{CAMERA}')
    if not isinstance(frames, h5py.Dataset):
        raise ValueError(f'{where} has no obs/{CAMERA} dataset (the agent-view camera)')
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f'{where}/obs/{CAMERA} is {frames.dtype} {list(frames.shape)}, '
                         'expected uint8 [N, H, W, 3]')
    if frames.shape[0] != len(actions):
        raise ValueError(f'{where}: {frames.shape[0]} frames but {len(actions)} actions')
    state = _read_state(where, group, len(actions)) if proprio else None
    return Episode(path, name, instruction, actions, state, _read_labelled(where, group,
                                                                            len(actions)))


def _read_labelled(where: str, group: h5py.Group, length: int) -> np.ndarray | None:
    """The demo's `labelled` marks [N] bool (`rsd collect-demos --action-noise`: 0 inside a
    perturbed chunk, where the recorded chunk is not the expert's plan from that state), or
    None when the demo has none (every step labelled, as in LIBERO's own files). A demo
    collected with action noise but without marks (collect-demos before 2026-12-04) is refused:
    its perturbed chunks' inner steps are not labels."""
    marks = group.get('labelled')
    if marks is None:
        if np.any(group.attrs.get('action_noise', 0.0)):
            raise ValueError(f'{where} was collected with action noise but has no "labelled" '
                             'marks (rsd collect-demos before 2026-12-04): the steps inside its '
                             "perturbed chunks are not the expert's plans; collect it again")
        return None
    if not isinstance(marks, h5py.Dataset) or marks.shape != (length,):
        raise ValueError(f'{where}/labelled has shape '
                         f'{list(getattr(marks, "shape", []))}, expected [{length}]')
    labelled = np.asarray(marks).astype(bool)
    if not labelled[0]:
        raise ValueError(f"{where}/labelled is 0 at step 0 (a chunk's first step is always "
                         "the expert's plan)")
    return labelled


def _read_state(where: str, group: h5py.Group, length: int) -> np.ndarray:
    """PROPRIO_DATASETS of one demo, concatenated: [N, P] float32."""
    parts = []
    for name in PROPRIO_DATASETS:
        values = group.get(f'obs/{name}')
        if not isinstance(values, h5py.Dataset):
            raise ValueError(f'{where} has no obs/{name} dataset (proprioception reads '
                             f'{", ".join(PROPRIO_DATASETS)}; train without it: --no-proprio)')
        if values.ndim != 2 or values.shape[0] != length:
            raise ValueError(f'{where}/obs/{name} has shape {list(values.shape)}, expected '
                             f'[{length}, n]')
        parts.append(np.asarray(values, dtype=np.float32))
    state = np.concatenate(parts, axis=1)
    if state.shape[1] != len(PROPRIO_NAMES):
        raise ValueError(f'{where}: {state.shape[1]} state values in {PROPRIO_DATASETS}, '
                         f'expected {len(PROPRIO_NAMES)} ({", ".join(PROPRIO_NAMES)})')
    if not np.isfinite(state).all():
        raise ValueError(f'{where}: non-finite values in {PROPRIO_DATASETS}')
    return state


def split_episodes(episodes: list[Episode], fraction: float,
                   seed: int) -> tuple[list[int], list[int]]:
    """Episode indices (train, held-out). Per instruction, round(fraction x its episodes) are
    held out (at least one episode overall when fraction > 0 and there are two or more)."""
    rng = np.random.default_rng([seed, 1])
    by_task = defaultdict(list)
    for index, episode in enumerate(episodes):
        by_task[episode.instruction].append(index)
    held = []
    for indices in by_task.values():
        count = min(len(indices) - 1, round(fraction * len(indices)))
        held += [int(i) for i in rng.permutation(indices)[:max(count, 0)]]
    if fraction > 0 and not held and len(episodes) > 1:
        held = [int(rng.integers(len(episodes)))]
    held = sorted(held)
    return [i for i in range(len(episodes)) if i not in set(held)], held


def demo_provenance(episodes: list[Episode]) -> list[dict]:
    """[{path, sha256, episodes, frames}] per demo file."""
    files = defaultdict(list)
    for episode in episodes:
        files[episode.file].append(episode.length)
    return [{'path': str(path.resolve()), 'sha256': file_sha256(path),
             'episodes': len(lengths), 'frames': int(sum(lengths))}
            for path, lengths in files.items()]
