"""Bad-input corpus of the data layer: every malformed index entry, outside path, absurd size or
corrupt file gives ONE line (DataError) naming the file or entry and the fix, before any large
allocation; a bad sample leaves the others readable."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import shutil
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import common.events as events
import common.video as video
from common.data import (
    INDEX_NAME,
    ClipDataset,
    check_event_images,
    event_images_disagreement,
    load_event_frames,
    load_video_frames,
    read_image,
    sample_fields,
)
from common.errors import DataError
from common.events import EventStream, load_events, render_event_frames, save_events_npz
from tests.data_fixtures import make_stream, tiny_dataset  # noqa: F401  (session fixture)


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "; " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.fixture()
def data(tiny_dataset, tmp_path) -> Path:  # noqa: F811
    """A private copy of the 4-clip tiny dataset."""
    d = tmp_path / "ds"
    shutil.copytree(tiny_dataset, d)
    return d


def _index(d: Path) -> list:
    return json.loads((d / INDEX_NAME).read_text())


def _write_index(d: Path, entries) -> None:
    (d / INDEX_NAME).write_text(json.dumps(entries))


# ---- malformed index entries: refused when the dataset is opened, naming the index, entry and field ----

def _set(key, value):
    return lambda e: e.__setitem__(key, value)


def _drop(key):
    return lambda e: e.pop(key)


ENTRY_CASES = {
    "event_data is a number": (_set("event_data", 123), ["field 'event_data' is a int", "expected a path string"]),
    "event_data is a list": (_set("event_data", ["a.npz"]), ["field 'event_data' is a list"]),
    "mp4_data is an object": (_set("mp4_data", {"path": "x"}), ["field 'mp4_data' is a dict"]),
    "video_data is a bool": (_set("video_data", True), ["field 'video_data' is a bool"]),
    "split is a number": (_set("split", 5), ["field 'split' is a int"]),
    "id is null": (_set("id", None), ["field 'id' is a NoneType"]),
    "id is missing": (_drop("id"), ["has no id"]),
    "event_image is a string": (_set("event_image", "a.png"), ["field 'event_image'", "list of path strings"]),
    "event_image holds a number": (_set("event_image", ["a.png", 7]), ["field 'event_image'"]),
    "conversations is a string": (_set("conversations", "hi"), ["field 'conversations'"]),
    "conversation turn value is a number": (
        _set("conversations", [{"from": "human", "value": 3}]), ["field 'conversations'"]),
    "no human turn": (_set("conversations", [{"from": "gpt", "value": "a"}]), ["no human turn"]),
}


@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_malformed_entry_is_one_line(data, case) -> None:
    mutate, parts = ENTRY_CASES[case]
    entries = _index(data)
    entry_id = entries[1]["id"]
    mutate(entries[1])
    _write_index(data, entries)
    with pytest.raises(DataError) as e:
        ClipDataset(data)
    name = repr(entry_id) if "id" in entries[1] and entries[1]["id"] is not None else "#1"
    _one_line(e, str(data / INDEX_NAME), f"entry {name}", "fix the index", *parts)


def test_entry_that_is_not_an_object(data) -> None:
    _write_index(data, [*_index(data), 42])
    with pytest.raises(DataError) as e:
        ClipDataset(data, split="test")
    _one_line(e, str(data / INDEX_NAME), "entry #4 is a int")


# ---- paths that leave the dataset folder: refused, nothing outside is read ----

class _Planted:
    """Unpickling it touches a marker file (stands for code an attacker runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    return out


OUTSIDE_CASES = ["dotdot_event_data", "absolute_event_data", "dotdot_inside_video_data", "dotdot_event_image",
                 "symlinked_mp4", "symlinked_event_folder", "symlinked_ground_truth"]


@pytest.mark.parametrize("case", OUTSIDE_CASES)
def test_paths_outside_the_dataset_are_refused(data, tmp_path, case) -> None:
    outside = _outside(tmp_path)
    entries = _index(data)
    e0 = entries[0]
    field, shown = {
        "dotdot_event_data": ("event_data", "../outside/evil.npy"),
        "absolute_event_data": ("event_data", str(outside / "evil.npy")),
        "dotdot_inside_video_data": ("video_data", "video/../../outside"),
        "dotdot_event_image": ("event_image", "../outside/x.png"),
    }.get(case, (None, None))
    if case.startswith("symlinked"):
        field = {"symlinked_mp4": "mp4_data", "symlinked_event_folder": "event_data",
                 "symlinked_ground_truth": "ground_truth"}[case]
        target = data / (e0[field] if case != "symlinked_event_folder" else Path(e0[field]).parent)
        moved = outside / target.name
        shutil.move(target, moved)
        target.symlink_to(moved)
        shown = str(moved)
    elif field == "event_image":
        e0[field] = [shown] * 5
    else:
        e0[field] = shown
    _write_index(data, entries)
    with pytest.raises(DataError) as e:
        ClipDataset(data, allow_pickle=True)
    msg = _one_line(e, str(data / INDEX_NAME), f"entry {e0['id']!r}", field)
    assert "absolute path" in msg if case.startswith("absolute") else "outside the dataset folder" in msg


def test_planted_pickle_outside_is_never_unpickled(data, tmp_path) -> None:
    outside = _outside(tmp_path)
    marker = tmp_path / "code_ran"
    np.save(outside / "evil.npy", np.array(_Planted(marker), dtype=object), allow_pickle=True)
    entries = _index(data)
    entries[0]["event_data"] = "../outside/evil.npy"
    _write_index(data, entries)
    with pytest.raises(DataError, match="outside the dataset folder"):
        ClipDataset(data, allow_pickle=True)
    assert not marker.exists()


def test_frame_png_linked_outside_is_refused_at_read(data, tmp_path) -> None:
    sample = ClipDataset(data)[0]
    sample.video_path = None  # read the frame PNGs
    first = sorted(sample.frames_dir.glob("*.png"))[0]
    moved = _outside(tmp_path) / "frame.png"
    shutil.move(first, moved)
    first.symlink_to(moved)
    with pytest.raises(DataError) as e:
        load_video_frames(sample, 8)
    _one_line(e, str(first), "outside the dataset folder", "copy the frame into the dataset folder")


# ---- absurd sizes: refused from the declared sizes, before allocating ----

def _npy_header(shape: tuple, descr: str = "<u2") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz_with_huge_x(path: Path, n: int) -> None:
    s = make_stream(10)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", _npy_header((n,)) + b"\0" * 64)
        for k in "ytp":
            member = io.BytesIO()
            np.lib.format.write_array(member, getattr(s, k))
            zf.writestr(f"{k}.npy", member.getvalue())


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (pixel data absent: only the header is read)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _absurd_sensor(path: Path) -> None:
    s = make_stream(100)
    save_events_npz(path, EventStream(s.x, s.y, s.t, s.p, 10**6, 10**6, 0, 1_000_000))


def _huge_structured_npy(path: Path) -> None:
    path.write_bytes(_npy_header((10**11,), [("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")]) + b"\0" * 64)


SIZE_CASES = {
    "npz sensor 10^6 x 10^6": (".npz", _absurd_sensor, "sensor size 1000000x1000000 is outside the limit"),
    "npz x declares 10^10 events": (".npz", lambda p: _npz_with_huge_x(p, 10**10), "declares 10000000000 elements"),
    "npy declares 10^11 events": (".npy", _huge_structured_npy, "declares 100000000000 elements"),
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_absurd_event_sizes_are_refused_before_allocating(tmp_path, case) -> None:
    suffix, make, problem = SIZE_CASES[case]
    path = tmp_path / f"clip{suffix}"
    make(path)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            render_event_frames(load_events(path), 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(e, str(path), problem, "limit")
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB before refusing"


@pytest.mark.parametrize("side", [7000, 15000])
def test_huge_png_is_refused_from_its_header(tmp_path, side) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(side, side))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(e, str(path), "limit of 40000000 pixels")
    assert peak < 20 * 2**20


@pytest.mark.parametrize("limit", ["MAX_FRAME_PIXELS", "MAX_VIDEO_FRAMES"])
def test_mp4_beyond_the_limits_is_refused(data, monkeypatch, limit) -> None:
    sample = ClipDataset(data)[0]
    monkeypatch.setattr(video, limit, 100 if limit == "MAX_FRAME_PIXELS" else 5)
    with pytest.raises(DataError) as e:
        load_video_frames(sample, 8)
    problem = "video frame size 64x48 is outside the limit of 100" if limit == "MAX_FRAME_PIXELS" else \
        "more than the limit of 5"
    _one_line(e, str(sample.video_path), problem)


def test_absurd_event_count_after_unpickling_is_refused(tmp_path, monkeypatch) -> None:
    s = make_stream(50)
    path = tmp_path / "up.npy"
    np.save(path, {"x": s.x, "y": s.y, "t": s.t, "p": s.p, "width": 64, "height": 48}, allow_pickle=True)
    monkeypatch.setattr(events, "MAX_EVENTS", 10)
    with pytest.raises(DataError) as e:
        load_events(path, allow_pickle=True)
    _one_line(e, str(path), "declares 50 elements, more than the limit of 10 events", "split the clip")


def test_absurd_file_is_one_failed_sample_and_the_rest_go_on(data) -> None:
    ds = ClipDataset(data)
    _absurd_sensor(ds[2].event_path)
    errors: list = []
    good = list(ClipDataset(data).iter_samples(errors=errors))
    assert [s.id for s in good] == [ds[i].id for i in (0, 1, 3)]
    assert len(errors) == 1 and errors[0][0] == ds[2].id and "outside the limit" in errors[0][1]


# ---- corrupt or malformed media ----

def _save(path: Path, **arrays) -> None:
    np.savez(path, **arrays)


def _stream_arrays(n: int = 50) -> dict:
    s = make_stream(n)
    return {"x": s.x, "y": s.y, "t": s.t, "p": s.p, "width": 64, "height": 48}


def _corrupt_npz(path: Path, kind: str) -> None:
    a = _stream_arrays()
    if kind == "truncated npz":
        save_events_npz(path, make_stream(500))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "zero events":
        _save(path, **{k: (v[:0] if k in "xytp" else v) for k, v in a.items()})
    elif kind == "NaN timestamps":
        t = a["t"].astype(float)
        t[7] = np.nan
        _save(path, **{**a, "t": t})
    elif kind == "string coordinates":
        _save(path, **{**a, "x": a["x"].astype(str)})
    elif kind == "missing key p":
        _save(path, **{k: v for k, v in a.items() if k != "p"})
    elif kind == "width is text":
        _save(path, **{**a, "width": np.array("wide")})
    elif kind == "lengths differ":
        _save(path, **{**a, "y": a["y"][:-3]})
    elif kind == "pickled member":
        _save(path, **{**a, "x": np.array([{"a": 1}], dtype=object)})


CORRUPT_CASES = {
    "truncated npz": "corrupt or unreadable npz",
    "zero events": "empty event stream (0 events)",
    "NaN timestamps": "t holds NaN",
    "string coordinates": "x has dtype <U",
    "missing key p": "missing keys ['p']",
    "width is text": "width is not a number",
    "lengths differ": "different lengths",
    "pickled member": "npz holds pickled objects",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_events_file_is_one_line(tmp_path, case) -> None:
    path = tmp_path / "clip.npz"
    _corrupt_npz(path, case)
    with pytest.raises(DataError) as e:
        load_events(path)
    _one_line(e, str(path), CORRUPT_CASES[case])


@pytest.mark.parametrize("case", ["garbage png", "truncated png", "empty png"])
def test_corrupt_event_png_is_one_line(data, case) -> None:
    sample = ClipDataset(data, event_source="images")[0]
    png = sample.event_image_paths[2]
    body = png.read_bytes()
    png.write_bytes({"garbage png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                     "truncated png": body[: len(body) // 2], "empty png": b""}[case])
    with pytest.raises(DataError) as e:
        load_event_frames(sample, 5)
    _one_line(e, str(png), "corrupt or unreadable image", "regenerate")


def test_truncated_mp4_is_one_line(data) -> None:
    sample = ClipDataset(data)[0]
    body = sample.video_path.read_bytes()
    sample.video_path.write_bytes(body[: len(body) // 2])
    with pytest.raises(DataError) as e:
        load_video_frames(sample, 8)
    _one_line(e, str(sample.video_path), "mp4", "regenerate the clip")


# ---- 16-bit timestamps ----

def _u16_stream(tmp_path: Path, t: np.ndarray) -> Path:
    n = t.shape[0]
    rng = np.random.default_rng(3)
    path = tmp_path / "u16.npz"
    _save(path, x=rng.integers(0, 64, n).astype(np.uint16), y=rng.integers(0, 48, n).astype(np.uint16),
          t=t.astype(np.uint16), p=rng.integers(0, 2, n).astype(np.uint8), width=64, height=48)
    return path


def test_wrapped_uint16_timestamps_are_unwrapped(tmp_path) -> None:
    t = np.sort(np.random.default_rng(0).integers(0, 300_000, 2000))  # ~150 us apart, wraps 4 times
    path = _u16_stream(tmp_path, t % 65536)
    r = load_events(path)
    np.testing.assert_array_equal(r.t, t)  # every event keeps its place: frames are not scrambled
    raw = np.load(path)
    np.testing.assert_array_equal(r.x, raw["x"])
    assert r.time_start == t[0] and r.time_end == t[-1]


def test_monotonic_uint16_timestamps_load_unchanged(tmp_path) -> None:
    t = np.sort(np.random.default_rng(1).integers(0, 65_000, 500))
    np.testing.assert_array_equal(load_events(_u16_stream(tmp_path, t)).t, t)


def test_ambiguous_uint16_steps_back_are_refused(tmp_path) -> None:
    t = np.sort(np.random.default_rng(2).integers(0, 60_000, 500))
    t[100], t[101] = t[101] + 5, t[100]  # a small step back: disorder, or a wrap after a long gap?
    path = _u16_stream(tmp_path, t)
    with pytest.raises(DataError) as e:
        load_events(path)
    _one_line(e, str(path), "cannot be told from disorder", "monotonic int64")


# ---- event PNGs and events: source, pickle refusal, disagreement ----

def _swap_pngs(d: Path, a: int, b: int) -> tuple:
    """Give clip a the event PNGs of clip b (they were not rendered from clip a's events)."""
    ds = ClipDataset(d)
    for src, dst in zip(ds[b].event_image_paths, ds[a].event_image_paths):
        shutil.copyfile(src, dst)
    return ds[a].id, ds[a].event_image_paths


def test_sources_agree_on_rendered_pngs(data, caplog) -> None:
    from_events = ClipDataset(data, event_source="events")[0]
    from_images = ClipDataset(data, event_source="images")[0]
    with caplog.at_level(logging.WARNING):
        a, b = load_event_frames(from_events, 5), load_event_frames(from_images, 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not caplog.records
    assert sample_fields(from_images)["event_source"] == "images"
    assert sample_fields(from_events)["event_data"] == str(from_events.event_path)


def test_disagreeing_pngs_warn_once_under_events(data, caplog) -> None:
    sample_id, _ = _swap_pngs(data, 0, 1)
    ds = ClipDataset(data, max_questions=10)
    with caplog.at_level(logging.WARNING):
        frames = [load_event_frames(ds[i], 5) for i in range(3)]  # 3 questions of the same clip
    rendered = render_event_frames(load_events(ds[0].event_path), 5)
    np.testing.assert_array_equal(frames[0][2], rendered[2])  # the events are what is used
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"sample {sample_id}_q0" in warnings[0] and "disagree with the events" in warnings[0]
    assert "regenerate the PNGs" in warnings[0]


def test_disagreeing_pngs_are_refused_under_images(data) -> None:
    sample_id, pngs = _swap_pngs(data, 0, 1)
    ds = ClipDataset(data, event_source="images")
    with pytest.raises(DataError) as e:
        load_event_frames(ds[0], 5)
    _one_line(e, f"sample {sample_id}", str(pngs[0].parent), "--event_source events", "% >")
    assert len(load_event_frames(ds[1], 5)) == 5  # the next clip goes on


def test_harness_compares_pngs_before_the_timed_load(data, tmp_path) -> None:
    """The run loop checks the PNGs outside the sample's timers: the timed load finds the verdict cached."""
    from common.harness import Benchmark, RunSettings, run_benchmark

    sample_id, _ = _swap_pngs(data, 0, 1)
    seen: list = []

    class Bench(Benchmark):
        event_frames = 5

        def process(self, sample, unit, done):
            seen.append(dict(sample.clip_checks))  # what the timed stages would find
            return {"id": sample.id, "split": sample.split, "query": sample.question}

        def statistics(self, records):
            return {"num_samples": len(records), "num_failed": 0}

        def render(self, stats, records, run):
            return "# checks\n"

    settings = RunSettings(stage="checks", task_name="t", settings={"x": 1}, output_dir=str(tmp_path / "out"),
                           warmup_steps=0)
    run_benchmark(settings, list(ClipDataset(data))[:2], Bench)
    verdict = seen[0][("event_images_disagree", 5)]
    assert f"sample {sample_id}" in verdict and "disagree with the events" in verdict
    assert seen[1][("event_images_disagree", 5)] is None  # clip 1's own PNGs agree


def test_pickle_refusal_applies_whenever_events_are_the_source(data) -> None:
    ds = ClipDataset(data)
    npz = ds[0].event_path
    s = load_events(npz)
    np.save(npz.with_suffix(".npy"), {"x": s.x, "y": s.y, "t": s.t, "p": s.p, "width": 64, "height": 48},
            allow_pickle=True)
    npz.unlink()
    sample = ClipDataset(data)[0]  # event PNGs exist, yet the events are the source
    with pytest.raises(DataError) as e:
        load_event_frames(sample, 5)
    _one_line(e, str(npz.with_suffix(".npy")), "--allow_pickle", "--event_source images")
    from_images = ClipDataset(data, event_source="images")[0]  # the PNGs need no unpickling
    assert len(load_event_frames(from_images, 5)) == 5


def test_images_source_without_pngs_for_that_frame_count(data) -> None:
    sample = ClipDataset(data, event_source="images")[0]
    with pytest.raises(DataError) as e:
        load_event_frames(sample, 3)
    _one_line(e, str(data / INDEX_NAME), f"sample {sample.id}", "no stored event PNGs for 3 frames",
              "--event_source events")


def test_images_source_validates_the_pngs_not_the_events(data) -> None:
    ds = ClipDataset(data, event_source="images")
    ds[1].event_path.write_bytes(b"not events")
    ds[0].event_image_paths[0].write_bytes(b"garbage")
    errors: list = []
    good = [s.id for s in ds.iter_samples(errors=errors)]
    assert good == [ds[i].id for i in (1, 2, 3)]
    assert errors[0][0] == ds[0].id and str(ds[0].event_image_paths[0]) in errors[0][1]


def test_agreement_tolerance_accepts_other_renderers_and_rejects_other_clips(data) -> None:
    ds = ClipDataset(data)
    stream = load_events(ds[0].event_path)
    ours = render_event_frames(stream, 5)
    # another renderer of the same events: swapped colours, chunk boundaries moved by a few events
    shifted = [render_event_frames(stream.select(slice(3, None)), 5)[k][..., ::-1] for k in range(5)]
    assert event_images_disagreement(shifted, ours) is None
    other = render_event_frames(load_events(ds[1].event_path), 5)
    problem = event_images_disagreement(other, ours)
    assert problem is not None and float(problem.split("(")[1].split("%")[0]) > 20, problem


def test_untimed_check_first_then_the_load_does_not_compare_again(data, caplog) -> None:
    sample_id, _ = _swap_pngs(data, 0, 1)
    sample = ClipDataset(data)[0]
    with caplog.at_level(logging.WARNING):
        problem = check_event_images(sample, 5)
        load_event_frames(sample, 5)
    assert problem is not None and f"sample {sample_id}" in problem
    assert len(caplog.records) == 1
    assert check_event_images(ClipDataset(data)[2], 5) is None


# ---- the synthetic dataset maker ----

def test_maker_refuses_a_sensor_the_loader_would_refuse(tmp_path) -> None:
    from tests.data_fixtures import make_dataset

    with pytest.raises(SystemExit, match="2..4096"):
        make_dataset(tmp_path, num_clips=1, extra=["--width", "10000"])
    assert not (tmp_path / INDEX_NAME).exists()


def test_maker_refuses_a_malformed_existing_index_and_redoes_damaged_clips(tmp_path) -> None:
    from tests.data_fixtures import make_dataset

    make_dataset(tmp_path, num_clips=1)
    index = tmp_path / INDEX_NAME
    good = index.read_text()
    index.write_text("[1, 2]")
    with pytest.raises(DataError) as e:
        make_dataset(tmp_path, num_clips=1)
    _one_line(e, str(index), "move it away")
    index.write_text(good)
    gt = next((tmp_path / "ground_truth").rglob("*.json"))
    gt.write_text("{not json")
    assert make_dataset(tmp_path, num_clips=1)["generated"] == 1  # the damaged clip was made again
    assert json.loads(gt.read_text())
