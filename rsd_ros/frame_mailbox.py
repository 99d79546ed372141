"""The one-slot mailbox between the `rsd_policy` callbacks and its inference worker.

The image callback puts the newest frame (a frame not yet taken is replaced: the caller counts
it as dropped), the instruction and joint-state callbacks put theirs, and the worker blocks in
`take` until there is a frame and an instruction, or the node stops. Everything sits behind one
`threading.Condition`, so the worker wakes the moment work arrives and nothing polls.
The mailbox is closed while the node is not active (lifecycle): a closed mailbox holds no
frame and refuses new ones. `open_for_output` lets the worker publish only while the mailbox is
open and not stopping, so a chunk that finishes after a deactivation or during shutdown is
discarded instead of commanding the arm or racing the destruction of the publishers.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import threading
from typing import Any


@dataclass(frozen=True)
class Work:
    """What the worker takes: the newest frame (a sensor_msgs/Image), the time it was received
    (ns, the node's clock) and the instruction in force."""

    frame: Any
    received_ns: int
    instruction: str


class FrameMailbox:
    """Newest frame, newest joint state and the instruction in force, for one worker."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: tuple[Any, int] | None = None
        self._joints: Any = None
        self._instruction: str | None = None
        self._stopping = False
        self._open = False

    def open(self) -> None:
        """Accept frames (the node is active)."""
        with self._cond:
            self._open = True

    def close(self) -> None:
        """Refuse frames and drop the one not yet taken (the node is no longer active)."""
        with self._cond:
            self._open, self._frame = False, None

    @property
    def is_open(self) -> bool:
        """Whether frames are accepted."""
        with self._cond:
            return self._open

    def put_frame(self, frame: Any, received_ns: int) -> bool | None:
        """Store the newest frame; True if it replaced one the worker had not taken, None if
        the mailbox is closed (the frame is not kept)."""
        with self._cond:
            if not self._open:
                return None
            replaced = self._frame is not None
            self._frame = (frame, received_ns)
            self._cond.notify()
            return replaced

    def put_joints(self, joints: Any) -> None:
        """Store the newest joint state (sensor_msgs/JointState)."""
        with self._cond:
            self._joints = joints

    def put_instruction(self, text: str) -> bool:
        """Put `text` in force; True if it differs from the one in force before."""
        with self._cond:
            changed, self._instruction = text != self._instruction, text
            self._cond.notify()
            return changed

    @property
    def joints(self) -> Any:
        """The newest joint state, or None."""
        with self._cond:
            return self._joints

    @property
    def instruction(self) -> str | None:
        """The instruction in force, or None before the first valid one."""
        with self._cond:
            return self._instruction

    def take(self) -> Work | None:
        """Block until there is a frame and an instruction (take them) or the mailbox is
        stopped (None)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or (
                self._frame is not None and self._instruction is not None))
            if self._stopping:
                return None
            (frame, received_ns), self._frame = self._frame, None
            return Work(frame, received_ns, self._instruction)

    def stop(self) -> None:
        """Wake the worker for good: `take` returns None from now on."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @contextmanager
    def open_for_output(self) -> Iterator[bool]:
        """Hold the mailbox lock; yields False once closed or stopped (do not publish)."""
        with self._cond:
            yield self._open and not self._stopping
