"""The bridge's chunk inbox stays bounded under a flood: the oldest waiting chunks make room,
counted, order kept, and a consumer taking chunks meanwhile never loses one it could have had."""

import queue
import threading

import pytest

from sim_bridge.chunk_inbox import ChunkInbox


def test_a_flood_keeps_the_newest_chunks_in_order_and_counts_the_rest():
    inbox = ChunkInbox(limit=4)
    dropped = [inbox.put_newest(i) for i in range(10)]
    assert dropped == [False] * 4 + [True] * 6 and inbox.dropped == 6
    assert [inbox.get_nowait() for _ in range(4)] == [6, 7, 8, 9]
    assert inbox.empty()


def test_a_consumer_meanwhile_gets_every_chunk_not_dropped():
    inbox, taken, done = ChunkInbox(limit=8), [], threading.Event()

    def consume():
        while not done.is_set() or not inbox.empty():
            try:
                taken.append(inbox.get(timeout=0.01))
            except queue.Empty:
                pass

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(20000):
        inbox.put_newest(i)
    done.set()
    consumer.join(timeout=10)
    assert len(taken) + inbox.dropped == 20000
    assert taken == sorted(taken) and taken[-1] == 19999


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError, match='>= 1'):
        ChunkInbox(limit=0)
