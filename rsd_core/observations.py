"""Observation directories: the one reader and writer of the format (docs/ARCHITECTURE.md,
"Observation directories").

    <dir>/index.jsonl   one JSON object per line: {"image": "images/000000.png",
                        "instruction": str, ... any metadata ..., "proprio": [float]}
    <dir>/images/*.png  RGB uint8, upright as a camera delivers it, any size

Written by `rsd record-observations` (sim_bridge, LIBERO headless), by `rsd train-policy` (demo
frames for the draft) and for synthetic images; read by `rsd train-draft` and `rsd bench`. The
module is a file format, not the policy: no torch, so the simulator side may import it.
"""

from dataclasses import dataclass
import json
import logging
from pathlib import Path
import shutil
from types import TracebackType

import imageio.v3 as iio
import numpy as np

logger = logging.getLogger(__name__)

INDEX = 'index.jsonl'
IMAGES = 'images'


@dataclass
class Observation:
    """One line of index.jsonl with its image path resolved.

    meta: the line's other keys (suite, task_id, init_state, step, ...). proprio: the robot
    state [P] float32 recorded with the image ('proprio' in the line), or None; needed by models
    with proprioception.
    """

    image: Path
    instruction: str
    meta: dict
    proprio: np.ndarray | None = None


def read_observations(directory: str | Path, strict: bool = False) -> list[Observation]:
    """Parse `<dir>/index.jsonl`; skip (with a warning) or, when strict, refuse (ValueError
    naming the line) entries that cannot be used: bad JSON, no instruction, a missing image,
    a malformed proprio list. ValueError when there is no index.jsonl."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        raise ValueError(f'{directory}: not an observation directory (no {INDEX}); expected '
                         f'{INDEX} + {IMAGES}/ as written by `rsd record-observations`')
    observations, skipped = [], []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            observations.append(_parse(directory, line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f'{index}:{number}: {type(exc).__name__}: {exc}'
            if strict:
                raise ValueError(reason) from exc
            skipped.append(reason)
    for reason in skipped:
        logger.warning('skipped observation %s', reason)
    return observations


def _parse(directory: Path, line: str) -> Observation:
    """One index line -> Observation (the errors `read_observations` catches)."""
    entry = json.loads(line)
    image = directory / entry['image']
    instruction = entry['instruction']
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError('empty instruction')
    if not image.is_file():
        raise ValueError(f'image {image} not found')
    proprio = read_proprio(entry.get('proprio'))
    meta = {k: v for k, v in entry.items() if k not in ('image', 'instruction', 'proprio')}
    return Observation(image, instruction.strip(), meta, proprio)


def read_proprio(value: object) -> np.ndarray | None:
    """An index.jsonl 'proprio' value (a list of finite numbers, or absent) -> [P] float32."""
    if value is None:
        return None
    problem = f'proprio must be a non-empty list of finite numbers, got {value!r}'
    try:
        state = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(problem) from exc
    if state.ndim != 1 or not state.size or not np.isfinite(state).all():
        raise ValueError(problem)
    return state


def load_image(path: str | Path) -> np.ndarray:
    """An observation image as [H, W, 3] uint8 RGB (palette, grey or RGBA files converted)."""
    return np.asarray(iio.imread(path, mode='RGB'), dtype=np.uint8)


class ObservationWriter:
    """Writes an observation directory one image at a time (a context manager).

    Each `add` saves images/<n:06d>.png and appends its index line at once, so an interrupted
    run leaves a readable directory. replace: remove an existing index.jsonl and images/ first
    (otherwise the index is started afresh and same-named images are overwritten).
    """

    def __init__(self, directory: str | Path, replace: bool = False) -> None:
        self.directory = Path(directory)
        if replace:
            shutil.rmtree(self.directory / IMAGES, ignore_errors=True)
            (self.directory / INDEX).unlink(missing_ok=True)
        (self.directory / IMAGES).mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._index = open(self.directory / INDEX, 'w')         # closed by close()

    def add(self, image: np.ndarray, instruction: str, proprio: object = None,
            **meta: object) -> str:
        """Save image [H, W, 3] uint8 RGB and its line {image, instruction, **meta, proprio};
        proprio (the robot state, any sequence of numbers) is left out when None. Returns the
        image's name relative to the directory."""
        name = f'{IMAGES}/{self.count:06d}.png'
        iio.imwrite(self.directory / name, np.ascontiguousarray(image, dtype=np.uint8),
                    optimize=True)
        entry = {'image': name, 'instruction': instruction, **meta}
        if proprio is not None:
            entry['proprio'] = [float(v) for v in proprio]
        self._index.write(json.dumps(entry) + '\n')
        self._index.flush()
        self.count += 1
        return name

    def close(self) -> None:
        """Close the index file."""
        self._index.close()

    def __enter__(self) -> 'ObservationWriter':
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
