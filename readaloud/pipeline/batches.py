"""Training batches built ahead in a background thread (--prefetch), identical to building them in line."""
from __future__ import annotations

import queue
import threading


class BatchesAhead:
    """Yields (i, make(i)) for i in `indices`; with depth > 0 the batches are built that many
    ahead in a background thread, so a GPU does not wait for augmentation and collation. Each
    batch has its own seeded generator, so the stream is identical either way."""

    def __init__(self, make, indices, depth: int = 0):
        self.make, self.indices, self.depth = make, list(indices), depth
        self._stop = threading.Event()
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="batches-ahead")
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for i in self.indices:
                if self._stop.is_set() or not self._put((i, self.make(i), None)):
                    return
        except BaseException as exc:  # handed to the training loop, raised there
            self._put((None, None, exc))

    def __iter__(self):
        if self.depth <= 0:
            for i in self.indices:
                yield i, self.make(i)
            return
        try:
            for _ in self.indices:
                i, batch, exc = self._queue.get()
                if exc is not None:
                    raise exc
                yield i, batch
        finally:  # the loop ended, broke or raised: stop building
            self._stop.set()
