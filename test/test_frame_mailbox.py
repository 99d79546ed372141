"""The mailbox's batching window and the batch decoding's fallback, without a node: plain
threads, a fake engine. Durations are bounded loosely (a loaded 2-core machine)."""

import threading
import time

import numpy as np
import pytest

from rsd_core.stats import ChunkStats
from rsd_ros.frame_mailbox import FrameMailbox, Work
from rsd_ros.inference_worker import Frame, decode_frames
from rsd_ros.policy_parameters import PARAMETERS, parameter_problem

WINDOW = 0.5              # s


def mailbox(arms: int, instructed: int) -> FrameMailbox:
    """An open mailbox of `arms` arms, the first `instructed` with an instruction."""
    box = FrameMailbox(arms)
    box.open()
    for arm in range(instructed):
        box.put_instruction(arm, f'task {arm}')
    return box


def timed_take(box: FrameMailbox, window: float = WINDOW) -> tuple[list, float]:
    start = time.monotonic()
    batch = box.take_batch(window)
    return batch, time.monotonic() - start


def later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def test_one_arm_never_waits_and_the_newest_frame_wins():
    box = mailbox(1, 1)
    assert box.put_frame(0, 'old', 1) is False
    assert box.put_frame(0, 'new', 2) is True                # replaced: counted as dropped
    batch, took = timed_take(box, window=10.0)
    assert [(w.arm, w.frame, w.received_ns, w.instruction) for w in batch] == [
        (0, 'new', 2, 'task 0')]
    assert took < 5.0


def test_frames_due_together_are_one_batch_and_the_window_ends_when_all_are_there():
    box = mailbox(3, 3)
    box.put_frame(2, 'c', 1)
    threads = [later(0.05, lambda: box.put_frame(0, 'a', 2)),
               later(0.1, lambda: box.put_frame(1, 'b', 3))]
    batch, took = timed_take(box, window=10.0)
    assert [(w.arm, w.frame) for w in batch] == [(0, 'a'), (1, 'b'), (2, 'c')]
    assert took < 5.0                                        # not the 10 s window
    for thread in threads:
        thread.join()


def test_a_silent_arm_costs_at_most_the_window_one_without_instruction_nothing():
    box = mailbox(3, 2)                                      # arm 2 has no instruction
    box.put_frame(0, 'a', 1)
    box.put_frame(2, 'waits for its instruction', 1)
    batch, took = timed_take(box)                            # arm 1 instructed and silent
    assert [(w.arm, w.frame) for w in batch] == [(0, 'a')]
    assert WINDOW * 0.9 <= took < WINDOW + 3.0
    box.put_frame(0, 'a2', 2)
    box.put_frame(1, 'b', 2)                                 # all instructed arms have one
    batch, took = timed_take(box)
    assert [w.arm for w in batch] == [0, 1] and took < WINDOW * 0.9
    box.put_instruction(2, 'task 2')
    assert [w.frame for w in box.take_batch(WINDOW)] == ['waits for its instruction']


def test_closing_drops_frames_and_stopping_ends_the_worker():
    box = mailbox(2, 2)
    box.put_frame(0, 'a', 1)
    box.close()
    assert box.put_frame(1, 'b', 1) is None and not box.is_open
    result = []
    thread = threading.Thread(target=lambda: result.append(box.take_batch(WINDOW)))
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()                                 # nothing to take while closed
    box.stop()
    thread.join(timeout=5.0)
    assert result == [None]


class FakeEngine:
    """predict_batch raises when any instruction is 'breaks alone', predict only for that
    input: an input that breaks the engine."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def predict_batch(self, images, instructions, proprios=None):
        self.calls.append(('batch', len(images)))
        if 'breaks alone' in instructions:
            raise RuntimeError('batch failed')
        return np.stack([np.full((8, 7), float(i)) for i in range(len(images))]), ChunkStats()

    def predict(self, image, instruction, proprio=None):
        self.calls.append(('alone', 1))
        if instruction == 'breaks alone':
            raise ValueError('this input breaks the engine')
        return np.full((8, 7), float(image[0, 0, 0])), ChunkStats()


def frames(*instructions: str) -> list[Frame]:
    return [Frame(Work(arm, None, 0, text), 0, np.full((2, 2, 3), arm, np.uint8), None)
            for arm, text in enumerate(instructions)]


def test_a_batch_is_decoded_once_and_a_failing_one_frame_by_frame():
    engine = FakeEngine()
    decoded, error = decode_frames(engine, frames('a', 'b', 'c'))
    assert error is None and engine.calls == [('batch', 3)]
    assert [d.batch for d in decoded] == [3, 3, 3]
    np.testing.assert_array_equal(decoded[2].actions, np.full((8, 7), 2.0))

    engine = FakeEngine()
    decoded, error = decode_frames(engine, frames('a', 'breaks alone', 'c'))
    assert isinstance(error, RuntimeError)
    assert engine.calls == [('batch', 3)] + [('alone', 1)] * 3
    assert [d.error is None for d in decoded] == [True, False, True]   # only its own arm
    assert isinstance(decoded[1].error, ValueError) and decoded[1].actions is None
    np.testing.assert_array_equal(decoded[2].actions, np.full((8, 7), 2.0))
    assert [d.batch for d in decoded] == [1, 1, 1]

    engine = FakeEngine()
    decoded, error = decode_frames(engine, frames('alone'))
    assert error is None and engine.calls == [('alone', 1)] and decoded[0].batch == 1


@pytest.mark.parametrize('value, reason', [
    (['arm0', 'arm0'], 'listed twice'),
    (['/arm0'], 'relative names'),
    (['0arm'], 'relative names'),
    (['arm 1'], 'relative names'),
    ([f'arm{i}' for i in range(33)], 'at most 32'),
])
def test_bad_arm_lists_are_refused(value, reason):
    assert reason in parameter_problem('arms', value, {})


def test_arm_parameters_are_read_only():
    assert parameter_problem('arms', ['arm0', 'left/arm1'], {}) is None
    assert PARAMETERS['arms'][1].read_only and PARAMETERS['batch_window'][1].read_only
