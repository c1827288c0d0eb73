"""Tests for common/events.py: loading/validation, safe npz, equal-count chunks, rendering."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.errors import DataError
from common.events import (
    EventStream,
    load_events,
    render_event_frames,
    render_event_image,
    save_events_npz,
    split_equal_count,
)
from tests.data_fixtures import make_stream


def _upstream_npy(path, stream: EventStream, **extra) -> None:
    d = {"x": stream.x, "y": stream.y, "t": stream.t, "p": stream.p, "time_start": stream.time_start,
         "time_end": stream.time_end, "duration_ms": 1000}
    d.update(extra)
    np.save(path, d, allow_pickle=True)


def test_npz_roundtrip_and_determinism(tmp_path) -> None:
    s = make_stream(500)
    save_events_npz(tmp_path / "a.npz", s)
    save_events_npz(tmp_path / "b.npz", s)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    r = load_events(tmp_path / "a.npz")
    for k in "xytp":
        np.testing.assert_array_equal(getattr(r, k), getattr(s, k))
    assert (r.width, r.height, r.time_start, r.time_end) == (64, 48, 0, 1_000_000)
    assert r.x.dtype == np.uint16 and r.t.dtype == np.int64 and r.p.dtype == np.uint8
    assert not list(tmp_path.glob("*.tmp"))


def test_pickled_npy_needs_allow_pickle(tmp_path) -> None:
    s = make_stream(100, 640, 480)
    path = tmp_path / "000000.npy"
    _upstream_npy(path, s)
    with pytest.raises(DataError, match="--allow_pickle") as e:
        load_events(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    r = load_events(path, allow_pickle=True)
    assert len(r) == 100 and (r.width, r.height) == (640, 480)  # default sensor size


def test_unsorted_is_sorted_stably(tmp_path) -> None:
    s = make_stream(200)
    order = np.random.default_rng(1).permutation(200)
    shuffled = EventStream(s.x[order], s.y[order], s.t[order], s.p[order], 64, 48, 0, 1_000_000)
    save_events_npz(tmp_path / "u.npz", shuffled)
    r = load_events(tmp_path / "u.npz")
    assert np.all(np.diff(r.t) >= 0)
    np.testing.assert_array_equal(np.sort(r.t), r.t)


def _bad_files(tmp_path):
    s = make_stream(50)
    cases = {}
    cases["missing"] = (tmp_path / "missing.npz", "not found")
    p = tmp_path / "corrupt.npy"
    p.write_bytes(b"\x93NUMPY garbage that is not a header")
    cases["corrupt npy"] = (p, "corrupt")
    p = tmp_path / "corrupt.npz"
    p.write_bytes(b"PK\x03\x04 truncated zip")
    cases["corrupt npz"] = (p, "corrupt")
    p = tmp_path / "nokeys.npz"
    np.savez(p, x=s.x, y=s.y, t=s.t)
    cases["missing keys"] = (p, "missing keys")
    p = tmp_path / "empty.npz"
    save_events_npz(p, s.select(slice(0, 0)))
    cases["empty"] = (p, "empty event stream")
    p = tmp_path / "range.npz"
    bad = EventStream(s.x.copy(), s.y.copy(), s.t, s.p, 64, 48, 0, 1_000_000)
    bad.x[3] = 64
    save_events_npz(p, bad)
    cases["out of range"] = (p, "out of range")
    p = tmp_path / "range_default.npy"
    big = make_stream(50, 700, 480)
    _upstream_npy(p, big)  # no width/height stored -> 640x480 assumed, x up to 699
    cases["out of range default size"] = (p, "out of range")
    return cases


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    for name, (path, problem) in _bad_files(tmp_path).items():
        with pytest.raises(DataError) as e:
            load_events(path, allow_pickle=True)
        msg = str(e.value)
        assert str(path) in msg, name
        assert problem in msg, (name, msg)
        assert "; " in msg and "\n" not in msg, name


def test_split_equal_count_sizes() -> None:
    s = make_stream(1003)
    for n in (1, 5, 7, 1003, 1100):
        chunks = split_equal_count(s, n)
        sizes = [len(c) for c in chunks]
        assert len(chunks) == n and sum(sizes) == 1003
        assert max(sizes) - min(sizes) <= 1
    chunks = split_equal_count(s, 5)
    np.testing.assert_array_equal(np.concatenate([c.t for c in chunks]), s.t)


def test_render_colours_and_overwrite() -> None:
    s = EventStream(np.array([1, 2, 2], np.uint16), np.array([0, 1, 1], np.uint16), np.array([0, 1, 2]),
                    np.array([0, 0, 1], np.uint8), width=4, height=3)
    img = render_event_image(s)
    assert img.shape == (3, 4, 3) and img.dtype == np.uint8
    assert tuple(img[0, 1]) == (0, 0, 255)  # polarity 0 blue
    assert tuple(img[1, 2]) == (255, 0, 0)  # later event (p=1, red) overwrites
    assert tuple(img[2, 3]) == (255, 255, 255)
    frames = render_event_frames(make_stream(100), 5)
    assert len(frames) == 5 and all(f.shape == (48, 64, 3) for f in frames)


def test_render_640x480_100k_is_vectorised() -> None:
    s = make_stream(100_000, 640, 480)
    render_event_image(s)
    t0 = time.perf_counter()
    img = render_event_image(s)
    ms = (time.perf_counter() - t0) * 1000
    assert img.shape == (480, 640, 3)
    assert ms < 500, f"render took {ms:.0f} ms"
    # every event pixel has its last event's colour
    flat = s.y.astype(int) * 640 + s.x
    last = {}
    for i, f in enumerate(flat[:2000].tolist()):
        last[f] = i
    sub = render_event_image(s.select(slice(0, 2000)))
    for f, i in list(last.items())[:200]:
        expect = (255, 0, 0) if s.p[i] else (0, 0, 255)
        assert tuple(sub[f // 640, f % 640]) == expect
