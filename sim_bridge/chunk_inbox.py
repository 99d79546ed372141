"""The queue between the bridge's chunk subscription and its simulator thread.

Bounded, so a peer flooding `action_chunk` while the simulator steps or renders costs at most
`limit` waiting chunks of memory: `put_newest` never blocks, and when the inbox is full the
oldest waiting chunk is dropped (and counted) to make room. The newest chunks are the ones that
can still answer the current observation.
"""

import queue
from typing import Any

INBOX_LIMIT = 16     # chunks waiting for the simulator thread


class ChunkInbox(queue.Queue):
    """A FIFO of at most `limit` chunks; `dropped` counts the oldest ones pushed out."""

    def __init__(self, limit: int = INBOX_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f'inbox limit must be >= 1, got {limit}')
        super().__init__(maxsize=limit)
        self.dropped = 0

    def put_newest(self, item: Any) -> bool:
        """Queue `item` without blocking; True if an older chunk had to be dropped for it.
        (One producer, the subscription callback; the consumer may take items meanwhile.)"""
        dropped = False
        while True:
            try:
                self.put_nowait(item)
                return dropped
            except queue.Full:
                try:
                    self.get_nowait()
                    self.dropped += 1
                    dropped = True
                except queue.Empty:
                    pass
