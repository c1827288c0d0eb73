"""MP4 reading/writing with PyAV, Video-LLaVA frame sampling, and an on-disk frame cache."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.events import atomic_write_bytes
from common.results import atomic_write

__all__ = ["sample_frame_indices", "read_mp4_frames", "count_mp4_frames", "FrameCache", "write_mp4", "mp4_codec",
           "MAX_FRAME_PIXELS", "MAX_VIDEO_FRAMES", "check_frame_size"]

log = logging.getLogger(__name__)

# Sane limits on what a file declares, checked before decoding: 40 M pixels per frame or image is
# above 8K UHD (33 M; DSEC frames are 1.6 M), and 36,000 frames is 30 minutes at 20 fps (a clip is 20).
MAX_FRAME_PIXELS = 40_000_000
MAX_VIDEO_FRAMES = 36_000


def check_frame_size(path: Path, width: int, height: int, what: str = "frame") -> None:
    """DataError when a declared width x height is empty or above MAX_FRAME_PIXELS."""
    if width <= 0 or height <= 0 or width * height > MAX_FRAME_PIXELS:
        raise DataError(f"{path}: {what} size {width}x{height} is outside the limit of {MAX_FRAME_PIXELS} pixels; "
                        f"downscale the {what}s or regenerate the clip")


def _check_frame_count(path: Path, frames: int) -> None:
    if frames > MAX_VIDEO_FRAMES:
        raise DataError(f"{path}: mp4 holds {frames} frames, more than the limit of {MAX_VIDEO_FRAMES}; "
                        "cut the video into clips")


def sample_frame_indices(total: int, n: int = 8) -> np.ndarray:
    """Video-LLaVA's sampling: ``np.arange(0, total, total / n).astype(int)`` (trimmed to n)."""
    if total <= 0 or n <= 0:
        raise ValueError(f"need total > 0 and n > 0, got total={total}, n={n}")
    return np.arange(0, total, total / n).astype(int)[:n]


def _open(path: Path):
    import av

    if not path.is_file():
        raise DataError(f"{path}: mp4 file not found; check the dataset index paths or regenerate the dataset")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated mp4 ({exc}); re-encode or regenerate the clip") from exc
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: mp4 has no video stream; re-encode or regenerate the clip")
    stream = container.streams.video[0]
    try:
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width and height:  # 0 = not declared in the header: each decoded frame is checked instead
            check_frame_size(path, width, height, "video frame")
        _check_frame_count(path, int(stream.frames or 0))
    except DataError:
        container.close()
        raise
    return container


def count_mp4_frames(path: str | os.PathLike) -> int:
    """Number of video frames, counted by demuxing packets (no decoding). Raises DataError if unreadable."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        count = 0
        for pkt in container.demux(video=0):
            count += bool(pkt.size)
            _check_frame_count(path, count)
        return count
    except av.error.FFmpegError as exc:
        raise DataError(f"{path}: corrupt or truncated mp4 ({exc}); re-encode or regenerate the clip") from exc
    finally:
        container.close()


def read_mp4_frames(path: str | os.PathLike, n: int = 8) -> np.ndarray:
    """Decode ``n`` frames sampled as Video-LLaVA does: (n, H, W, 3) uint8 RGB.

    Raises DataError for a missing, truncated or corrupt mp4, one with fewer than ``n`` frames, or
    one whose declared frame size or count is beyond MAX_FRAME_PIXELS / MAX_VIDEO_FRAMES. Only the
    sampled frames are kept (a file without a frame count is counted by demuxing first).
    """
    import av

    path = Path(path)
    container = _open(path)
    try:
        total = int(container.streams.video[0].frames or 0) or count_mp4_frames(path)
        if total < n:
            raise DataError(f"{path}: only {total} frames, need {n}; use fewer frames or a longer clip")
        wanted = sample_frame_indices(total, n)
        wanted_set = set(wanted.tolist())
        got: dict[int, np.ndarray] = {}
        count = 0
        for i, frame in enumerate(container.decode(video=0)):
            count = i + 1
            if i in wanted_set:
                check_frame_size(path, frame.width, frame.height, "video frame")
                got[i] = frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise DataError(f"{path}: corrupt or truncated mp4 ({exc}); re-encode or regenerate the clip") from exc
    finally:
        container.close()
    if count < total:
        raise DataError(f"{path}: truncated mp4 (decoded {count} of {total} frames); re-encode or regenerate the clip")
    return np.stack([got[i] for i in wanted.tolist()])


class FrameCache:
    """On-disk cache of sampled mp4 frames: one .npy per (absolute path, size, mtime, n).

    Writes go to a temp file and ``os.replace``, so concurrent builders and interruptions never
    leave a partial entry. ``hits``/``misses`` count lookups of this instance.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def key(self, mp4_path: str | os.PathLike, n: int = 8) -> str:
        """Cache key of an mp4: hash of its absolute path, size, mtime and n."""
        path = Path(mp4_path).resolve()
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise DataError(f"{path}: mp4 file not found; check the dataset index paths") from exc
        text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{n}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path_for(self, mp4_path: str | os.PathLike, n: int = 8) -> Path:
        """Where the cached frames of this mp4 live."""
        return self.cache_dir / f"{self.key(mp4_path, n)}.npy"

    def get(self, mp4_path: str | os.PathLike, n: int = 8) -> np.ndarray:
        """Frames of ``mp4_path`` (n, H, W, 3) uint8; decodes only on a cache miss."""
        entry = self.path_for(mp4_path, n)
        mapped = self._mapped(entry, n)
        if mapped is not None:
            self.hits += 1
            return np.array(mapped)
        self.misses += 1
        frames = read_mp4_frames(mp4_path, n)
        self._store(entry, frames)
        return frames

    def ensure(self, mp4_path: str | os.PathLike, n: int = 8) -> None:
        """Decode ``mp4_path`` into the cache unless a sound entry is there (which is not read)."""
        if self._mapped(self.path_for(mp4_path, n), n) is None:
            self.get(mp4_path, n)

    @staticmethod
    def _mapped(entry: Path, n: int) -> np.ndarray | None:
        """The entry memory-mapped when it holds n frames of a sane shape (only its header is read); else None."""
        if not entry.is_file():
            return None
        try:  # a damaged entry's declared shape is checked before anything is read
            mapped = np.load(entry, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # a damaged cache entry is rebuilt by get
        ok = (mapped.ndim == 4 and mapped.shape[0] == n and mapped.shape[3] == 3 and mapped.dtype == np.uint8
              and 0 < mapped.shape[1] * mapped.shape[2] <= MAX_FRAME_PIXELS)
        return mapped if ok else None

    def _store(self, entry: Path, frames: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, frames, allow_pickle=False)

        atomic_write(entry, write)


@functools.lru_cache(maxsize=1)
def mp4_codec() -> str:
    """'libx264' when PyAV's build has it, else 'mpeg4' (logged once)."""
    import av

    if "libx264" in av.codecs_available:
        return "libx264"
    log.warning("PyAV has no libx264 encoder: writing mp4 with the 'mpeg4' codec instead")
    return "mpeg4"


def encode_mp4_bytes(frames: Iterable[np.ndarray], fps: int = 20) -> bytes:
    """Encode RGB uint8 frames (H, W even) to mp4 bytes (libx264, yuv420p, single thread: deterministic)."""
    import av

    buf = io.BytesIO()
    container = av.open(buf, mode="w", format="mp4")
    stream = None
    try:
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frames must be HxWx3 uint8 RGB, got shape {frame.shape}")
            if stream is None:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
                codec = mp4_codec()
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.thread_count = 1
                if codec == "libx264":
                    stream.options = {"crf": "20", "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return buf.getvalue()


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int = 20) -> None:
    """Write RGB uint8 frames to an mp4 (libx264, yuv420p, even sizes), atomically."""
    atomic_write_bytes(path, encode_mp4_bytes(frames, fps))
