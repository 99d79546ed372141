"""LIBERO HDF5 demonstrations: finding the files, reading validated actions, action chunks.

LIBERO's layout: `data/demo_<i>/actions` [N, A] float and `data/demo_<i>/obs/<camera>` frames,
with the task language in `data.attrs['problem_info']`. The readers of the training commands
(`train_tokenizer`: actions only; `train_policy`: actions, frames and language) share these.
"""

from pathlib import Path

import h5py
import numpy as np


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
