"""Streaming in blocks of rows: memory follows a block, not a tensor. Computing blocks overlaps with
writing them: numpy and file writes release the GIL, so a couple of threads keep both cores busy
while the main thread writes finished blocks in order."""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads that compute blocks: all of a small machine's cores, up to 8 (blocks are read and written
# on threads of their own). VCU128_WORKERS sets it (measuring).
WORKERS = int(os.environ.get("VCU128_WORKERS") or min(8, os.cpu_count() or 1))
BLOCK_BYTES = 32 << 20  # a block of rows is about this size


def rows_per_block(row_bytes: int, multiple: int = 1) -> int:
    """Rows in a block of about BLOCK_BYTES, a multiple of `multiple` (the port count when packing)."""
    rows = max(1, BLOCK_BYTES // row_bytes)
    return max(multiple, rows // multiple * multiple)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], ahead: int = WORKERS + 1, workers: int = WORKERS) -> Iterator[R]:
    """fn(item) for every item, computed on a pool of `workers` threads, yielded in order. At most
    `ahead` results exist at once, so memory stays bounded by a few blocks. (More workers than
    cores suit work that waits: reads, for the disk to have several at once.)"""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def import_in_background(module: str) -> None:
    """Start importing `module` on a thread, for a step that needs it later (torch, for the RoPE
    table: seconds, while the step's own work leaves a core free). An `import` of it afterwards
    waits for this one; a failure here is left for that import to raise."""

    def load() -> None:
        try:
            __import__(module)
        except BaseException:  # noqa: BLE001 - raised again, where it is imported for use
            pass

    threading.Thread(target=load, name=f"import-{module}", daemon=True).start()


def in_background(fn: Callable[..., R], *args) -> Future:
    """fn(*args), started now on a thread of its own; `.result()` waits for it and raises what it
    raised. For reading and decoding that is needed later, beside the caller's own work (file reads,
    numpy and torch release the GIL). Not a daemon: the process ends only once it has ended."""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name=f"background-{getattr(fn, '__name__', 'work')}").start()
    return future
