"""Whether a frame may be acted on: its stamp and the robot state that goes with it.

Pure functions (no node), so the rules are tested alone: an image is acted on only if its
stamp is neither older than `max_age` nor more than `max_skew` in the future (a peer's clock, or
a forged stamp, must not make a stale frame look fresh or a latency negative), and a robot state
only if every value is a physical one (|value| <= max_abs, rad or m) before the model sees it.
"""

from collections.abc import Sequence

import numpy as np


def stamp_problem(stamp_ns: int, now_ns: int, max_age: float, max_skew: float,
                  ) -> tuple[str, str] | None:
    """None if an image stamped `stamp_ns` may be acted on at `now_ns` (integer ns), else
    (counter, reason): 'future' beyond max_skew s ahead or before 1970, 'stale' older than
    max_age s (0 = no limit)."""
    age = (now_ns - stamp_ns) * 1e-9
    if stamp_ns < 0 or -age > max_skew:
        return 'future', (f'image stamped {-age:.3f} s in the future (more than max_clock_skew '
                          f'{max_skew} s) or before 1970: not acted on')
    if max_age <= 0 or age <= max_age:
        return None
    hint = ' (header.stamp is not set)' if stamp_ns == 0 else ''
    return 'stale', f'image {age:.3f} s old > max_image_age {max_age} s: not acted on{hint}'


def state_problem(state: np.ndarray, names: Sequence[str], max_abs: float) -> str | None:
    """None if every value of the robot state [P] is within +-max_abs, else the reason naming
    the joints outside."""
    outside = ~(np.abs(state) <= max_abs)                   # NaN counts as outside
    if not outside.any():
        return None
    bad = [name for name, out in zip(names, outside, strict=True) if out]
    return (f'joint_states values of {bad} beyond +-{max_abs} (max_state_abs): not given to '
            'the model')
