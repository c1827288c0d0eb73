"""Synchronised timers: wall-clock with device sync and a shared clock.

GPU work is asynchronous: every wall-clock timer here synchronises the device before it
reads the clock at start and at stop, so a measured interval covers the queued kernels.
For work running concurrently on several CUDA streams use :class:`Clock` spans that
synchronise only their own stream.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DeviceLike = torch.device | str | int | None

# Held while a CUDA graph is captured (``common.models.decoder.capture_graph``). A device-wide
# synchronize from any thread during a capture fails the capture ("operation not permitted when
# stream is capturing"), and ``torch.cuda.graph`` itself synchronizes the device before it begins,
# so captures take this lock one at a time and ``sync`` waits for it. Re-entrant: a capturing
# thread may take it again.
CAPTURE_LOCK = threading.RLock()


def _as_device(device: DeviceLike) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def sync(device: DeviceLike = None) -> None:
    """``torch.cuda.synchronize`` for a CUDA device (when CUDA is available); a no-op otherwise.

    Waits while another thread captures a CUDA graph (``CAPTURE_LOCK``), so concurrent capture is safe.
    """
    dev = _as_device(device)
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        with CAPTURE_LOCK:
            torch.cuda.synchronize(dev)


def sync_current_stream(device: DeviceLike = None) -> None:
    """Wait for the calling thread's current CUDA stream only (other streams keep running); no-op on CPU."""
    dev = _as_device(device)
    if dev is not None and dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()


class Timer:
    """Wall-clock timer that synchronises ``device`` before start and before stop.

    >>> with Timer("cpu") as t:
    ...     pass
    >>> t.seconds >= 0
    True
    """

    def __init__(self, device: DeviceLike = None):
        self.device = device
        self.seconds: float = 0.0
        self._start: float | None = None

    def start(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        """Stop and return the elapsed seconds."""
        if self._start is None:
            raise RuntimeError("Timer.stop() called before start()")
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
        self._start = None
        return self.seconds

    @property
    def ms(self) -> float:
        return self.seconds * 1000.0

    def __enter__(self) -> Timer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def timer(device: DeviceLike = None) -> Timer:
    """A :class:`Timer` for use as ``with timer(device) as t: ...; t.seconds``."""
    return Timer(device)


class Clock:
    """A shared time origin so several threads record intervals on one timeline.

    ``clock.now()`` is seconds since the origin; ``clock.record(label, start, end, lane)``
    stores an interval (thread-safe); ``with clock.span(label, lane, stream=s): ...``
    records one around a block, synchronising only ``stream`` (or ``device``) at both
    ends. ``clock.intervals`` lists dicts ``{label, start, end, lane, thread}`` (seconds)
    sorted by start; the lane defaults to the recording thread's name.
    """

    def __init__(self) -> None:
        self._origin = time.perf_counter()
        self._lock = threading.Lock()
        self._intervals: list[dict[str, Any]] = []

    @property
    def origin(self) -> float:
        """The ``time.perf_counter()`` value of time zero."""
        return self._origin

    def reset(self) -> None:
        """Move the origin to now and drop the recorded intervals."""
        with self._lock:
            self._origin = time.perf_counter()
            self._intervals.clear()

    def now(self) -> float:
        """Seconds since the origin."""
        return time.perf_counter() - self._origin

    def record(self, label: str, start: float, end: float, lane: str | None = None) -> dict[str, Any]:
        """Store the interval [start, end] (seconds since origin) and return it."""
        thread = threading.current_thread().name
        item = {
            "label": str(label),
            "start": float(start),
            "end": float(end),
            "lane": str(lane) if lane is not None else thread,
            "thread": thread,
        }
        with self._lock:
            self._intervals.append(item)
        return item

    @contextmanager
    def span(
        self,
        label: str,
        lane: str | None = None,
        *,
        stream: Any | None = None,
        device: DeviceLike = None,
    ) -> Iterator[dict[str, Any]]:
        """Record the interval around the block; yields a dict filled with start/end on exit.

        With ``stream`` the stream is synchronised at both ends (other streams keep running);
        otherwise ``device`` is synchronised (``sync``), which is a no-op on CPU.
        """
        self._sync(stream, device)
        out: dict[str, Any] = {"label": label, "start": self.now()}
        try:
            yield out
        finally:
            self._sync(stream, device)
            end = self.now()
            out.update(self.record(label, out["start"], end, lane))

    @staticmethod
    def _sync(stream: Any | None, device: DeviceLike) -> None:
        if stream is not None:
            stream.synchronize()
        else:
            sync(device)

    @property
    def intervals(self) -> list[dict[str, Any]]:
        """A copy of the recorded intervals, sorted by start time."""
        with self._lock:
            items = [dict(i) for i in self._intervals]
        return sorted(items, key=lambda i: (i["start"], i["end"]))

    def intervals_ms(self) -> list[dict[str, Any]]:
        """The intervals with start/end in milliseconds (what :func:`common.plots.plot_timeline` draws)."""
        return [{**i, "start": i["start"] * 1000.0, "end": i["end"] * 1000.0} for i in self.intervals]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect garbage now, untimed, then keep Python's cyclic collector off inside the block.

    A full collection walks every tracked object: with both models loaded (~370k objects, mostly
    modules and parameters) it took 180 ms on the CPU and up to ~300 ms on the GPU machine, and an
    automatic one can land inside a timed stage. Surviving objects are frozen, so later
    collections skip them. Benchmarks run each sample inside this block.
    """
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
