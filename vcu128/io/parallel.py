"""Streaming in blocks of rows: memory follows a block, not a tensor. Computing blocks overlaps with
writing them: numpy and file writes release the GIL, so a couple of threads keep both cores busy
while the main thread writes finished blocks in order."""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads that compute blocks: all of a small machine's cores, up to 8 (blocks are read and written
# on threads of their own). VCU128_WORKERS sets it (measuring).


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's CPU set), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity query (macOS)
        return os.cpu_count() or 1


WORKERS = int(os.environ.get("VCU128_WORKERS") or min(8, usable_cores()))
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


def in_background(fn: Callable[..., R], *args, **kwargs) -> Future:
    """fn(*args, **kwargs), started now on a thread of its own; `.result()` waits for it and raises
    what it raised. For reading and decoding that is needed later, beside the caller's own work (file
    reads, numpy and torch release the GIL). Not a daemon: the process ends only once it has ended."""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name=f"background-{getattr(fn, '__name__', 'work')}").start()
    return future


def in_a_process(fn: Callable[..., R], *args, nicer: int = 10) -> R:
    """fn(*args) in a process of its own, `nicer` steps of niceness below this one: its result
    returned here, or its exception raised here (both pickled). For CPU work beside this process's
    own Python: threads here would share one interpreter lock and the same priority with it. The
    process starts fresh (spawn: none of this one's threads, locks or GPU state are copied), and its
    log records are handed to this process's loggers, so they read as if logged here."""
    context = multiprocessing.get_context("spawn")
    try:
        records = context.Queue()
    except OSError:  # no semaphores here (a container without /dev/shm): in this process, then
        return fn(*args)
    relay = logging.handlers.QueueListener(records, _Relay())
    relay.start()
    try:
        level = logging.getLogger("vcu128").getEffectiveLevel()
        with ProcessPoolExecutor(1, mp_context=context, initializer=_start_process, initargs=(records, level, nicer)) as pool:
            return pool.submit(fn, *args).result()
        # leaving the pool waited for the process to end, and so for its last records to be sent
    finally:
        relay.stop()


class _Relay(logging.Handler):
    """A record from another process, handled by the logger of its name here."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _start_process(records, level: int, nicer: int) -> None:
    """In a process of in_a_process: nicer, and its records (at this process's level) sent back."""
    try:
        os.nice(nicer)
    except (AttributeError, OSError):  # no priorities here: it runs at this process's
        pass
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
