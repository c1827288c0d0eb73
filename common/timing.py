"""Synchronised timers: wall-clock with device sync, per-stage accumulation, CUDA events, shared clock.

GPU work is asynchronous: every wall-clock timer here synchronises the device before it
reads the clock at start and at stop, so a measured interval covers the queued kernels.
For work running concurrently on several CUDA streams use :class:`CudaEventTimer` (events
on one stream, no device-wide sync) or :class:`Clock` spans that synchronise only their
own stream.
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


class StageTimer:
    """Accumulates synchronised wall-clock seconds per named stage.

    ``with st.stage("stage3_vision_encode", device): ...`` adds to ``st.times[name]``;
    entering the same name again accumulates, and ``st.counts[name]`` counts the entries.
    """

    def __init__(self, device: DeviceLike = None):
        self.device = device
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, device: DeviceLike = None) -> Iterator[Timer]:
        t = Timer(device if device is not None else self.device)
        t.start()
        try:
            yield t
        finally:
            t.stop()
            self.add(name, t.seconds)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` (for times measured elsewhere)."""
        self.times[name] = self.times.get(name, 0.0) + float(seconds)
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.times.values())

    def as_ms(self) -> dict[str, float]:
        """Stage times in milliseconds."""
        return {k: v * 1000.0 for k, v in self.times.items()}

    def reset(self) -> None:
        self.times.clear()
        self.counts.clear()


class CudaEventTimer:
    """Times work queued on one CUDA stream with an event pair; perf_counter fallback on CPU.

    ``start()`` / ``stop()`` record events on ``stream`` (default: the current stream of
    ``device``) without synchronising anything, so concurrent streams are not serialised.
    ``elapsed_ms()`` waits for the end event and returns the GPU time between the events.
    """

    def __init__(self, device: DeviceLike = None, stream: Any | None = None):
        dev = _as_device(device)
        if dev is None and stream is not None and hasattr(stream, "device"):
            dev = stream.device
        self.use_cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
        self.device = dev
        self.stream = stream
        self._start_evt: Any = None
        self._end_evt: Any = None
        self._t0: float | None = None
        self._t1: float | None = None

    def _stream(self) -> Any:
        return self.stream if self.stream is not None else torch.cuda.current_stream(self.device)

    def start(self) -> CudaEventTimer:
        if self.use_cuda:
            self._start_evt = torch.cuda.Event(enable_timing=True)
            self._end_evt = torch.cuda.Event(enable_timing=True)
            self._start_evt.record(self._stream())
        else:
            self._t0 = time.perf_counter()
            self._t1 = None
        return self

    def stop(self) -> CudaEventTimer:
        if self.use_cuda:
            if self._end_evt is None:
                raise RuntimeError("CudaEventTimer.stop() called before start()")
            self._end_evt.record(self._stream())
        else:
            if self._t0 is None:
                raise RuntimeError("CudaEventTimer.stop() called before start()")
            self._t1 = time.perf_counter()
        return self

    def elapsed_ms(self) -> float:
        """Milliseconds between start and stop (waits for the stop event on CUDA)."""
        if self.use_cuda:
            if self._start_evt is None or self._end_evt is None:
                raise RuntimeError("CudaEventTimer not started/stopped")
            self._end_evt.synchronize()
            return float(self._start_evt.elapsed_time(self._end_evt))
        if self._t0 is None or self._t1 is None:
            raise RuntimeError("CudaEventTimer not started/stopped")
        return (self._t1 - self._t0) * 1000.0

    def __enter__(self) -> CudaEventTimer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


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
