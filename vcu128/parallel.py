"""Overlap computing blocks with writing them: numpy and file writes release the GIL, so a couple of
threads keep both cores busy while the main thread writes finished blocks in order."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS = min(4, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], ahead: int = WORKERS + 1) -> Iterator[R]:
    """fn(item) for every item, computed on a thread pool, yielded in order. At most `ahead`
    results exist at once, so memory stays bounded by a few blocks."""
    with ThreadPoolExecutor(WORKERS) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
