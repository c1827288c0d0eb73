"""Prepare the next items on a background thread while the caller works on the current one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], prepare: Callable[[T], R], depth: int = 2) -> Iterator[tuple[T, R]]:
    """Yield ``(item, prepare(item))`` in order; ``prepare`` runs on one worker thread up to ``depth`` items ahead.

    Disk reads, decoding and resizing (NumPy, PIL, torch copies) mostly release the interpreter
    lock, so they overlap with the caller's GPU work. An exception raised by ``prepare`` is
    raised here when its item comes up. Breaking out of the loop cancels what was not started.
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")
    source = iter(items)
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(prepare, item)))
                if len(pending) > depth:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()
