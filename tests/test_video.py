"""Tests for common/video.py: sampling, mp4 round trip, bad mp4s, frame cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

import common.video as video
from common.errors import DataError
from common.video import FrameCache, count_mp4_frames, read_mp4_frames, sample_frame_indices, write_mp4


def _frames(n: int = 20, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames with a bright square sliding right over a gradient (easy to compare after lossy coding)."""
    out = np.zeros((n, h, w, 3), np.uint8)
    out[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, None, :, None]
    for k in range(n):
        out[k, 10:30, 2 * k:2 * k + 16] = (250, 40, 40)
    return out


@pytest.fixture()
def mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path, _frames())
    return path


def test_sample_frame_indices_matches_reference() -> None:
    for total in (8, 10, 20, 37, 300):
        ref = np.arange(0, total, total / 8).astype(int)
        np.testing.assert_array_equal(sample_frame_indices(total, 8), ref[:8])
    assert sample_frame_indices(20, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]


def test_mp4_roundtrip(mp4) -> None:
    assert video.mp4_codec() == "libx264"
    assert count_mp4_frames(mp4) == 20
    frames = read_mp4_frames(mp4, 8)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    src = _frames()[sample_frame_indices(20, 8)].astype(int)
    assert np.abs(frames.astype(int) - src).mean() < 8  # lossy, but the right frames


def test_write_is_deterministic(tmp_path) -> None:
    write_mp4(tmp_path / "a.mp4", _frames())
    write_mp4(tmp_path / "b.mp4", _frames())
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_odd_size_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((3, 47, 64, 3), np.uint8))


def test_bad_mp4s(tmp_path, mp4) -> None:
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(2000))
    short = tmp_path / "short.mp4"
    write_mp4(short, _frames(4))
    cases = [(tmp_path / "missing.mp4", "not found"), (truncated, "truncated"), (garbage, "corrupt"),
             (short, "only 4 frames")]
    for path, problem in cases:
        with pytest.raises(DataError) as e:
            read_mp4_frames(path, 8)
        assert str(path) in str(e.value) and problem in str(e.value), str(e.value)


def test_frame_cache_hits_without_decoding(tmp_path, mp4, monkeypatch) -> None:
    cache = FrameCache(tmp_path / "cache")
    direct = read_mp4_frames(mp4, 8)
    cold = cache.get(mp4, 8)
    np.testing.assert_array_equal(cold, direct)
    assert (cache.hits, cache.misses) == (0, 1)

    def boom(*a, **k):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(video, "read_mp4_frames", boom)
    warm = FrameCache(tmp_path / "cache").get(mp4, 8)  # a fresh instance reads the same files
    np.testing.assert_array_equal(warm, direct)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_frame_cache_key_tracks_file_and_n(tmp_path, mp4) -> None:
    cache = FrameCache(tmp_path / "cache")
    k8, k4 = cache.key(mp4, 8), cache.key(mp4, 4)
    assert k8 != k4
    st = mp4.stat()
    os.utime(mp4, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.key(mp4, 8) != k8
    # a damaged entry is rebuilt, not returned
    cache.path_for(mp4, 8).parent.mkdir(parents=True, exist_ok=True)
    cache.path_for(mp4, 8).write_bytes(b"junk")
    np.testing.assert_array_equal(cache.get(mp4, 8), read_mp4_frames(mp4, 8))


def test_untimed_checks_decode_the_clip_before_any_timed_row(tmp_path, mp4, monkeypatch) -> None:
    """The baseline row must not pay the mp4 decode that later rows get from the frame cache."""
    from types import SimpleNamespace

    from common.data import load_video_frames
    from common.harness import Benchmark

    direct = read_mp4_frames(mp4, 8)
    cache = FrameCache(tmp_path / "cache")
    sample = SimpleNamespace(frame_cache=cache, video_path=mp4, event_path=None)
    Benchmark().untimed_checks(sample)
    assert (cache.hits, cache.misses) == (0, 1)
    Benchmark().untimed_checks(sample)  # the next row's set-up: the entry is there, nothing is read
    assert (cache.hits, cache.misses) == (0, 1)

    def boom(*a, **k):
        raise AssertionError("a timed load decoded the mp4")

    monkeypatch.setattr(video, "read_mp4_frames", boom)
    np.testing.assert_array_equal(load_video_frames(sample), direct)  # what the first timed row loads
    assert (cache.hits, cache.misses) == (1, 1)
