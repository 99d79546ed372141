"""The mailbox between the `rsd_policy` callbacks and its inference worker: one slot per arm.

Each arm's image callback puts its newest frame (a frame not yet taken is replaced: the caller
counts it as dropped), its instruction and joint-state callbacks put theirs, and the worker
blocks in `take_batch` until some arm has a frame and an instruction, or the node stops.
Everything sits behind one `threading.Condition`, so the worker wakes the moment work arrives
and nothing polls.

Batching window. Frames of several arms that are due together are decoded as one batch. Once
the worker, free, finds a first frame ready, it waits at most `window` seconds (monotonic
clock) for the other arms, then takes every frame ready at that moment. It stops waiting early
as soon as every arm that has an instruction in force has a frame waiting (with one arm: at
once, so a single arm never waits). An arm that is slow or silent therefore costs the others at
most one window per batch and never holds them back longer; an arm without an instruction is
not waited for at all. A frame replaced during the window is replaced as usual (newest wins).

The mailbox is closed while the node is not active (lifecycle): a closed mailbox holds no
frame and refuses new ones. `open_for_output` lets the worker publish only while the mailbox is
open and not stopping, so a chunk that finishes after a deactivation or during shutdown is
discarded instead of commanding the arm or racing the destruction of the publishers.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import threading
import time
from typing import Any


@dataclass(frozen=True)
class Work:
    """What the worker takes for one arm: the arm's index, its newest frame (a
    sensor_msgs/Image), the time it was received (ns, the node's clock) and the arm's
    instruction in force."""

    arm: int
    frame: Any
    received_ns: int
    instruction: str


class FrameMailbox:
    """Newest frame, newest joint state and the instruction in force of each of `arms` arms,
    for one worker."""

    def __init__(self, arms: int = 1) -> None:
        if arms < 1:
            raise ValueError(f'a mailbox needs at least one arm, got {arms}')
        self._cond = threading.Condition()
        self._frames: list[tuple[Any, int] | None] = [None] * arms
        self._joints: list[Any] = [None] * arms
        self._instructions: list[str | None] = [None] * arms
        self._stopping = False
        self._open = False

    def open(self) -> None:
        """Accept frames (the node is active)."""
        with self._cond:
            self._open = True

    def close(self) -> None:
        """Refuse frames and drop those not yet taken (the node is no longer active)."""
        with self._cond:
            self._open = False
            self._frames = [None] * len(self._frames)

    @property
    def is_open(self) -> bool:
        """Whether frames are accepted."""
        with self._cond:
            return self._open

    def put_frame(self, arm: int, frame: Any, received_ns: int) -> bool | None:
        """Store arm `arm`'s newest frame; True if it replaced one the worker had not taken,
        None if the mailbox is closed (the frame is not kept)."""
        with self._cond:
            if not self._open:
                return None
            replaced = self._frames[arm] is not None
            self._frames[arm] = (frame, received_ns)
            self._cond.notify()
            return replaced

    def put_joints(self, arm: int, joints: Any) -> None:
        """Store arm `arm`'s newest joint state (sensor_msgs/JointState)."""
        with self._cond:
            self._joints[arm] = joints

    def put_instruction(self, arm: int, text: str) -> bool:
        """Put `text` in force for arm `arm`; True if it differs from the one before."""
        with self._cond:
            changed = text != self._instructions[arm]
            self._instructions[arm] = text
            self._cond.notify()
            return changed

    def joints(self, arm: int) -> Any:
        """Arm `arm`'s newest joint state, or None."""
        with self._cond:
            return self._joints[arm]

    def instruction(self, arm: int) -> str | None:
        """Arm `arm`'s instruction in force, or None before its first valid one."""
        with self._cond:
            return self._instructions[arm]

    def take_batch(self, window: float) -> list[Work] | None:
        """Block until some arm has a frame and an instruction, wait up to `window` s for the
        other arms (see the module docstring), and take every ready frame, in arm order; None
        once the mailbox is stopped."""
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._stopping or any(self._ready()))
                if self._stopping:
                    return None
                deadline = time.monotonic() + window
                while not (self._stopping or self._full()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return None
                batch = []
                for arm, ready in enumerate(self._ready()):
                    if ready:
                        (frame, received_ns), self._frames[arm] = self._frames[arm], None
                        batch.append(Work(arm, frame, received_ns, self._instructions[arm]))
                if batch:                # else closed during the window: wait again
                    return batch

    def _ready(self) -> list[bool]:
        """Per arm: a frame and an instruction are there (lock held)."""
        return [frame is not None and text is not None
                for frame, text in zip(self._frames, self._instructions, strict=True)]

    def _full(self) -> bool:
        """Every arm with an instruction in force has a frame waiting (lock held)."""
        return all(frame is not None
                   for frame, text in zip(self._frames, self._instructions, strict=True)
                   if text is not None)

    def stop(self) -> None:
        """Wake the worker for good: `take_batch` returns None from now on."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @contextmanager
    def open_for_output(self) -> Iterator[bool]:
        """Hold the mailbox lock; yields False once closed or stopped (do not publish)."""
        with self._cond:
            yield self._open and not self._stopping
