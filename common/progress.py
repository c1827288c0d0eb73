"""One progress helper for long loops: a tqdm bar on a terminal, a log line every N seconds otherwise.

    from common.progress import progress
    for sample in progress(samples, desc="extract", unit="sample"):
        ...

When stderr is not a terminal (``nohup ... > log 2>&1``) a bar would fill the log with carriage
returns; instead one line ``desc: 12/100 sample (0.8 sample/s, 15 s elapsed, ~110 s left)`` is
written to stderr every ``every_s`` seconds (default 30, env ``PROGRESS_EVERY_S``) and at the end
(loops shorter than that stay silent).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

DEFAULT_EVERY_S = 30.0


def _every_s(every_s: float | None) -> float:
    if every_s is not None:
        return float(every_s)
    try:
        return float(os.environ.get("PROGRESS_EVERY_S", DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S


def progress_line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """The one line a non-terminal run logs, e.g. ``extract: 12/100 sample (0.80 sample/s, 15 s elapsed, ~110 s left)``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total}" if total is not None else str(done)
    left = f", ~{(total - done) / rate:.0f} s left" if total is not None and rate > 0 and done < total else ""
    return f"{desc}: {count} {unit} ({rate:.2f} {unit}/s, {elapsed:.0f} s elapsed{left})"


def _logged(iterable: Iterable[T], desc: str, unit: str, total: int | None, every_s: float,
            stream: TextIO, clock=time.monotonic) -> Iterator[T]:
    start = last = clock()
    done, printed = 0, False
    for item in iterable:
        yield item
        done += 1
        now = clock()
        if now - last >= every_s:
            print(progress_line(desc, done, total, unit, now - start), file=stream, flush=True)
            last, printed = now, True
    if printed or clock() - start >= every_s:  # short loops stay silent
        print(progress_line(desc, done, total, unit, clock() - start) + " done", file=stream, flush=True)


def progress(iterable: Iterable[T], desc: str = "", unit: str = "it", *, total: int | None = None,
             every_s: float | None = None, disable: bool = False, stream: TextIO | None = None) -> Iterator[T]:
    """Iterate ``iterable`` with a tqdm bar on a terminal, else a log line every ``every_s`` seconds.

    ``disable`` turns both off (e.g. on non-main ranks). ``total`` defaults to ``len(iterable)``
    where it has one.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if disable:
        return iter(iterable)
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return iter(tqdm(iterable, desc=desc, unit=unit, total=total, file=stream))
    return _logged(iterable, desc, unit, total, _every_s(every_s), stream)


class _LogBar:
    """A counter with tqdm's ``update``/``close`` that logs a line every ``every_s`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, every_s: float, stream: TextIO,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._initial, self._every_s, self._stream, self._clock = initial, every_s, stream, clock
        self._start = self._last = clock()
        self._printed = self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self._every_s:
            self._print(now)
            self._last, self._printed = now, True

    def _print(self, now: float, suffix: str = "") -> None:
        done = self.n - self._initial
        total = None if self.total is None else self.total - self._initial
        line = progress_line(self.desc, done, total, self.unit, now - self._start)
        if self._initial:
            line += f" [{self.n}/{self.total} with earlier runs]"
        print(line + suffix, file=self._stream, flush=True)

    def close(self) -> None:
        if not self._closed and (self._printed or self._clock() - self._start >= self._every_s):  # inf: silent
            self._print(self._clock(), " done")
        self._closed = True

    def __enter__(self) -> _LogBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", unit: str = "it", *, initial: int = 0,
                 every_s: float | None = None, disable: bool = False, stream: TextIO | None = None):
    """A tqdm-like counter (``update(n)``, ``close()``, context manager) for loops that are not one iterable.

    On a terminal it is a tqdm bar; otherwise it logs like :func:`progress`.
    """
    stream = stream if stream is not None else sys.stderr
    if not disable and getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return _LogBar(total, desc, unit, initial, math.inf if disable else _every_s(every_s), stream)
