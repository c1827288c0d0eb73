"""Event streams: safe loading/saving, equal-count chunking and event-image rendering.

Upstream clip files are ``.npy`` files holding a *pickled* dict (x, y, t, p, time_start, ...).
Unpickling runs code, so it only happens when the caller passes ``allow_pickle=True``.
The toolkit's own format is a plain ``.npz`` (no pickle) with arrays x, y, t, p and the
scalars time_start, time_end, duration_ms, width, height.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.results import atomic_write_bytes  # noqa: F401  (re-exported: the data layer's writers use it)

__all__ = [
    "DEFAULT_WIDTH",
    "DEFAULT_HEIGHT",
    "MAX_EVENTS",
    "MAX_SENSOR_SIDE",
    "EventStream",
    "load_events",
    "save_events_npz",
    "split_equal_count",
    "render_event_image",
    "render_event_frames",
]

DEFAULT_WIDTH = 640
DEFAULT_HEIGHT = 480
_REQUIRED_KEYS = ("x", "y", "t", "p")
# RGB colours of the two polarities: 0 (darker) blue, 1 (brighter) red, on a white canvas.
_POLARITY_RGB = np.array([[0, 0, 255], [255, 0, 0]], dtype=np.uint8)
_PICKLE_FIX = ("pass --allow_pickle (allow_pickle=True) only if you trust this file, convert it to .npz, "
               "or read the clip's event PNGs with --event_source images")
# Sane limits, checked on the sizes a file declares BEFORE anything of that size is allocated.
# DSEC clips hold ~1-20 M events per second on a 640x480 sensor; 100 M events (~1.3 GB as loaded)
# and 4096 px per side (the biggest event sensors today are 1280x720) leave ample headroom.
MAX_EVENTS = 100_000_000
MAX_SENSOR_SIDE = 4096
_U16 = 1 << 16  # a 16-bit timestamp counter wraps after 65536 us


@dataclass
class EventStream:
    """Events of one clip: x, y (uint16 pixels), t (int64 microseconds, sorted), p (uint8 0/1)."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    p: np.ndarray
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    time_start: int = 0
    time_end: int = 0

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @property
    def duration_ms(self) -> float:
        """Clip duration in milliseconds (time_end - time_start)."""
        return (self.time_end - self.time_start) / 1000.0

    def select(self, index: np.ndarray | slice) -> EventStream:
        """A new stream holding the selected events (same sensor size; times from the selection)."""
        t = self.t[index]
        start = int(t[0]) if len(t) else self.time_start
        end = int(t[-1]) if len(t) else self.time_start
        return EventStream(self.x[index], self.y[index], t, self.p[index], self.width, self.height, start, end)


def _fail(path: Path, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: {problem}; {fix}")


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) declared by the .npy header at the start of file object ``f`` (reads no data)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(n) for n in shape), dtype


def _check_count(path: Path, name: str, shape: tuple[int, ...]) -> None:
    """DataError when an array declares more elements than MAX_EVENTS (checked before loading it)."""
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if count > MAX_EVENTS:
        raise _fail(path, f"{name} declares {count} elements, more than the limit of {MAX_EVENTS} events",
                    "split the clip into shorter clips or re-export it")


def _npz_headers(path: Path) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(member, shape, dtype) of every array in an .npz, read from the headers alone."""
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                shape, dtype = _read_header(f)
            out.append((info.filename[: -len(".npy")], shape, dtype))
    return out


def _load_mapping(path: Path, allow_pickle: bool) -> dict:
    """Read the raw key -> value mapping of an events file (.npz or .npy)."""
    regenerate = "regenerate or re-export the clip"
    if path.suffix == ".npz":
        try:
            headers = _npz_headers(path)
        except (OSError, ValueError, EOFError, SyntaxError, zipfile.BadZipFile, KeyError) as exc:
            raise _fail(path, f"corrupt or unreadable npz ({type(exc).__name__}: {exc})", regenerate) from exc
        for name, shape, dtype in headers:
            if dtype.hasobject:
                raise _fail(path, "npz holds pickled objects", _PICKLE_FIX)
            _check_count(path, name, shape)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise _fail(path, "npz holds pickled objects", _PICKLE_FIX) from exc
            raise _fail(path, f"corrupt or unreadable npz ({exc})", regenerate) from exc
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise _fail(path, f"corrupt or unreadable npz ({type(exc).__name__}: {exc})", regenerate) from exc
    try:
        with open(path, "rb") as f:
            shape, dtype = _read_header(f)
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _fail(path, f"corrupt or unreadable npy header ({exc})", regenerate) from exc
    if dtype.hasobject and not allow_pickle:
        raise _fail(path, "npy holds a pickled object (upstream dict format) and loading it can run code",
                    _PICKLE_FIX)
    if not dtype.hasobject:
        _check_count(path, "the array", shape)
    try:
        arr = np.load(path, allow_pickle=allow_pickle)
    except Exception as exc:  # unpickling a corrupt payload can raise almost anything
        raise _fail(path, f"corrupt or unreadable npy ({type(exc).__name__}: {exc})", regenerate) from exc
    if arr.dtype == object and arr.shape == ():
        obj = arr.item()
        if not isinstance(obj, dict):
            raise _fail(path, f"npy holds a {type(obj).__name__}, expected a dict of x, y, t, p", regenerate)
        return obj
    if arr.dtype.names:
        return {name: arr[name] for name in arr.dtype.names}
    raise _fail(path, f"npy holds a plain {arr.dtype} array of shape {arr.shape}, expected a dict of x, y, t, p",
                regenerate)


def _scalar(path: Path, name: str, value, default: int) -> int:
    if value is None:
        return default
    try:
        return int(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise _fail(path, f"{name} is not a number ({exc})", "re-export the clip") from exc


def _sensor_size(path: Path, data: dict) -> tuple[int, int]:
    """(width, height) stored in the file (default 640x480), refused outside 1..MAX_SENSOR_SIDE."""
    width = _scalar(path, "width", data.get("width"), DEFAULT_WIDTH)
    height = _scalar(path, "height", data.get("height"), DEFAULT_HEIGHT)
    if not (0 < width <= MAX_SENSOR_SIDE and 0 < height <= MAX_SENSOR_SIDE):
        raise _fail(path, f"sensor size {width}x{height} is outside the limit of 1..{MAX_SENSOR_SIDE} px per side",
                    "store the real sensor width/height in the file")
    return width, height


def _monotonic_time(path: Path, t: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(t, order): timestamps made non-decreasing. A clean 16-bit counter wrap (every step back is
    a drop of more than half of 65536 us, all values inside 0..65535) is unwrapped in place;
    other steps back inside that range are ambiguous and refused; larger timestamps slightly out
    of order (merged sources) are sorted stably, ``order`` being the permutation applied."""
    step = np.diff(t)
    back = step < 0
    if not back.any():
        return t, None
    if t.min() >= 0 and t.max() < _U16:
        if np.all(step[back] <= -(_U16 // 2)):
            return t + _U16 * np.concatenate([[0], np.cumsum(back)]), None
        raise _fail(path, f"timestamps step back at {int(back.sum())} places by up to {int(-step.min())} us "
                    "inside the uint16 range, so a 16-bit counter wrap cannot be told from disorder",
                    "re-export the clip with monotonic int64 microsecond timestamps")
    order = np.argsort(t, kind="stable")
    return t[order], order


def load_events(path: str | os.PathLike, allow_pickle: bool = False) -> EventStream:
    """Load and validate an events file (.npz safe format, or upstream pickled-dict .npy).

    Raises DataError (one line: file, problem, fix) for a missing file, an unreadable file,
    a pickled file without ``allow_pickle``, missing keys, an empty stream, out-of-range
    coordinates, sizes beyond MAX_EVENTS / MAX_SENSOR_SIDE (checked before allocating) and
    ambiguous 16-bit timestamps. A clean uint16 timestamp wrap is unwrapped; larger timestamps
    slightly out of order are sorted with a stable argsort.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "events file not found", "check the dataset index paths or regenerate the dataset")
    data = _load_mapping(path, allow_pickle)
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise _fail(path, f"missing keys {missing} (has {sorted(map(str, data))})",
                    "the file must hold arrays x, y, t, p; re-export the clip")
    try:
        x, y, t, p = (np.asarray(data[k]).reshape(-1) for k in _REQUIRED_KEYS)
    except Exception as exc:
        raise _fail(path, f"x, y, t, p are not arrays ({exc})", "re-export the clip") from exc
    n = t.shape[0]
    if not (x.shape[0] == y.shape[0] == p.shape[0] == n):
        raise _fail(path, f"x, y, t, p have different lengths ({x.shape[0]}, {y.shape[0]}, {n}, {p.shape[0]})",
                    "re-export the clip")
    if n == 0:
        raise _fail(path, "empty event stream (0 events)", "drop this clip or re-export it with its events")
    _check_count(path, "t", (n,))
    width, height = _sensor_size(path, data)
    for name, arr in (("x", x), ("y", y), ("t", t), ("p", p)):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
                or arr.dtype == bool):
            raise _fail(path, f"{name} has dtype {arr.dtype}, expected numbers", "re-export the clip")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise _fail(path, f"{name} holds NaN or infinite values", "re-export the clip")
    xi, yi = x.astype(np.int64), y.astype(np.int64)
    if xi.min() < 0 or xi.max() >= width or yi.min() < 0 or yi.max() >= height:
        raise _fail(path, f"coordinates out of range: x in [{xi.min()}, {xi.max()}], y in [{yi.min()}, {yi.max()}]"
                    f" for a {width}x{height} sensor", "store width/height in the file or fix the coordinates")
    pi = p.astype(np.int64)
    bad_p = ~np.isin(pi, (-1, 0, 1))
    if bad_p.any():
        raise _fail(path, f"polarity values outside 0/1: {np.unique(pi[bad_p])[:5].tolist()}", "re-export the clip")
    t, order = _monotonic_time(path, t.astype(np.int64))
    if order is not None:
        xi, yi, pi = xi[order], yi[order], pi[order]
    time_start = _scalar(path, "time_start", data.get("time_start"), int(t[0]))
    time_end = _scalar(path, "time_end", data.get("time_end"), int(t[-1]))
    return EventStream(
        x=xi.astype(np.uint16), y=yi.astype(np.uint16), t=t, p=(pi > 0).astype(np.uint8),
        width=width, height=height, time_start=time_start, time_end=time_end,
    )


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz with fixed zip timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def save_events_npz(path: str | os.PathLike, stream: EventStream) -> None:
    """Save a stream in the safe .npz format (no pickle), atomically and byte-deterministically."""
    arrays = {
        "x": np.asarray(stream.x, dtype=np.uint16),
        "y": np.asarray(stream.y, dtype=np.uint16),
        "t": np.asarray(stream.t, dtype=np.int64),
        "p": np.asarray(stream.p, dtype=np.uint8),
        "time_start": np.int64(stream.time_start),
        "time_end": np.int64(stream.time_end),
        "duration_ms": np.float64(stream.duration_ms),
        "width": np.int64(stream.width),
        "height": np.int64(stream.height),
    }
    atomic_write_bytes(path, _npz_bytes(arrays))


def split_equal_count(stream: EventStream, n: int) -> list[EventStream]:
    """Split into ``n`` chunks of equal EVENT COUNT (not equal time); sizes differ by at most 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    base, extra = divmod(len(stream), n)
    sizes = np.full(n, base, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [stream.select(slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


def render_event_image(stream: EventStream, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Draw events on a white HxWx3 uint8 RGB canvas: polarity 0 blue, 1 red; later events win."""
    width = int(width or stream.width)
    height = int(height or stream.height)
    canvas = np.full((height * width, 3), 255, dtype=np.uint8)
    if len(stream):
        x = stream.x.astype(np.int64)
        y = stream.y.astype(np.int64)
        keep = (x < width) & (y < height)
        flat = (y * width + x)[keep]
        pol = stream.p[keep].astype(np.int64).clip(0, 1)
        # index of the LAST event at each pixel (explicit: repeated fancy assignment has no order guarantee)
        last = np.full(height * width, -1, dtype=np.int64)
        np.maximum.at(last, flat, np.arange(flat.shape[0], dtype=np.int64))
        hit = np.flatnonzero(last >= 0)
        canvas[hit] = _POLARITY_RGB[pol[last[hit]]]
    return canvas.reshape(height, width, 3)


def render_event_frames(stream: EventStream, n: int = 5) -> list[np.ndarray]:
    """Render ``n`` event images from equal-count chunks of the stream."""
    return [render_event_image(chunk, stream.width, stream.height) for chunk in split_equal_count(stream, n)]
