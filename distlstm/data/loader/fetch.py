"""Remote chunks of a plan window fetched and decoded on a few threads, and the next window of the
same stream started while the current one is in use.

A remote row group costs a network round trip. One at a time, a window of 16 costs 16 round trips
before its first batch; on a pool of threads (fetching waits on the network and Arrow decodes
without the GIL) it costs about one, and started one window ahead it is hidden behind the batches
of the window before it. Nothing is read that the worker would not read anyway: the next window is
the next window of its own stream. Local shards do not come here (Arrow reads them fast enough).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

THREADS = 8


class WindowFetcher:
    """Decodes the chunks of windows ahead, per process. `decode(chunk_id)` does the work; at most
    `max_pending` windows are begun and not yet taken (one per stream the worker reads)."""

    def __init__(self, decode: Callable[[int], object], threads: int = THREADS):
        self._decode, self._threads = decode, threads
        self.max_pending = 1
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None
        self._pending: OrderedDict[tuple, list[Future]] = OrderedDict()

    def _executor(self) -> ThreadPoolExecutor:
        # A DataLoader worker is forked from a process that may have used its own pool: threads do
        # not survive a fork, so each process starts its own.
        if self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="distlstm-fetch")
            self._pid, self._pending = os.getpid(), OrderedDict()
        return self._pool

    def start(self, key: tuple) -> None:
        """Begin decoding the chunks `key` (a window) in the background, unless already begun."""
        pool = self._executor()
        if key in self._pending:
            return
        while len(self._pending) >= self.max_pending:
            # The oldest window begun and not taken is dropped; its decodes finish and are discarded.
            self._pending.popitem(last=False)
        self._pending[key] = [pool.submit(self._decode, c) for c in key]

    def take(self, key: tuple) -> list:
        """The decoded chunks of `key`, in order (waiting for them; begun now if not yet)."""
        self._executor()
        futures = self._pending.pop(key, None)
        if futures is None:
            futures = [self._pool.submit(self._decode, c) for c in key]
        return [f.result() for f in futures]

    def __getstate__(self) -> dict:  # DataLoader workers started with spawn get a fresh fetcher
        return {**self.__dict__, "_pool": None, "_pid": None, "_pending": OrderedDict()}
