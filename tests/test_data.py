"""Tests for common/data.py: reading a clip dataset back, question selection, loaders, bad samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.data import (
    INDEX_NAME,
    ClipDataset,
    default_frame_cache,
    load_event_frames,
    load_video_frames,
)
from common.errors import DataError
from common.events import load_events
from common.synthetic import load_top_questions
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)


def test_one_question_per_clip(tiny_dataset) -> None:  # noqa: F811
    ds = ClipDataset(tiny_dataset, split="test")
    assert len(ds) == 4
    s = ds[0]
    index = json.loads((tiny_dataset / INDEX_NAME).read_text())
    assert s.id == s.clip_id == index[0]["id"]
    assert s.question == index[0]["conversations"][0]["value"].removeprefix("<event>\n")
    assert s.answer == index[0]["conversations"][1]["value"]
    assert s.event_path.is_file() and s.video_path.is_file() and s.frames_dir.is_dir()
    assert len(s.event_image_paths) == 5 and s.event_image_1f_path.is_file()
    assert [x.id for x in ds] == [e["id"] for e in index]


def test_ten_questions_with_ground_truth_answers(tiny_dataset) -> None:  # noqa: F811
    ds = ClipDataset(tiny_dataset, max_questions=10)
    assert len(ds) == 40
    top = [q["question"] for q in load_top_questions()][:10]
    first = [ds[i] for i in range(10)]
    assert [s.question for s in first] == top
    assert [s.id for s in first] == [f"{first[0].clip_id}_q{k}" for k in range(10)]
    assert all(isinstance(s.answer, str) and s.answer for s in first)
    assert len(ClipDataset(tiny_dataset, max_questions=50)) == 200


def test_questions_without_prefix_and_custom_file(tmp_path, tiny_dataset) -> None:  # noqa: F811
    d = tmp_path / "ds"
    shutil.copytree(tiny_dataset, d)
    index = json.loads((d / INDEX_NAME).read_text())
    index[0]["conversations"][0]["value"] = "How many cars are there?"
    shutil.rmtree(d / "ground_truth")
    for e in index:
        e.pop("ground_truth")
    (d / INDEX_NAME).write_text(json.dumps(index))
    assert ClipDataset(d)[0].question == "How many cars are there?"
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps([{"question": f"Q{k}?", "count": 10 - k} for k in range(10)]))
    ds = ClipDataset(d, max_questions=10, questions_file=qfile)
    assert ds[3].question == "Q3?" and ds[3].answer is None  # no ground truth -> no answer


def test_loaders(tiny_dataset) -> None:  # noqa: F811
    s = ClipDataset(tiny_dataset)[1]
    ev5 = load_event_frames(s, 5)
    assert len(ev5) == 5 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in ev5)
    assert load_event_frames(s, 1)[0].shape == (48, 64, 3)
    assert len(load_event_frames(s, 3)) == 3  # no stored PNGs for 3: rendered from the events
    video = load_video_frames(s, 8)
    assert video.shape == (8, 48, 64, 3) and video.dtype == np.uint8
    cache = default_frame_cache(tiny_dataset)
    assert cache.cache_dir == tiny_dataset / ".frame_cache"
    np.testing.assert_array_equal(load_video_frames(s, 8, cache=cache), video)
    s.video_path = None  # falls back to the frame PNGs (lossless, so close to but not equal to the mp4)
    png = load_video_frames(s, 8)
    assert png.shape == video.shape and np.abs(png.astype(int) - video.astype(int)).mean() < 10


def test_missing_index(tmp_path) -> None:
    with pytest.raises(DataError, match="make_synthetic_dataset") as e:
        ClipDataset(tmp_path)
    assert str(tmp_path / INDEX_NAME) in str(e.value)


def test_unknown_split(tiny_dataset) -> None:  # noqa: F811
    with pytest.raises(DataError, match="splits present"):
        ClipDataset(tiny_dataset, split="train")


def test_bad_samples_are_skipped_and_recorded(tmp_path, tiny_dataset) -> None:  # noqa: F811
    d = tmp_path / "ds"
    shutil.copytree(tiny_dataset, d)
    ds = ClipDataset(d, max_questions=10)
    clips = [ds[i * 10] for i in range(4)]
    # clip 0: truncated mp4; clip 1: corrupt events; clip 2: upstream pickled npy; clip 3 stays good
    mp4 = clips[0].video_path
    mp4.write_bytes(mp4.read_bytes()[:300])
    clips[1].event_path.write_bytes(b"PK\x03\x04 not really a zip")
    stream = load_events(clips[2].event_path)
    npy = clips[2].event_path.with_suffix(".npy")
    np.save(npy, {"x": stream.x, "y": stream.y, "t": stream.t, "p": stream.p}, allow_pickle=True)
    clips[2].event_path.unlink()
    ds = ClipDataset(d, max_questions=10)  # the index says .npz; the reader finds the .npy
    errors: list = []
    good = list(ds.iter_samples(errors=errors))
    assert [s.clip_id for s in good] == [clips[3].clip_id] * 10
    assert len(errors) == 30
    by_clip = {sid.rsplit("_q", 1)[0]: msg for sid, msg in errors}
    assert str(mp4) in by_clip[clips[0].clip_id]
    assert str(clips[1].event_path) in by_clip[clips[1].clip_id]
    assert "--allow_pickle" in by_clip[clips[2].clip_id] and str(npy) in by_clip[clips[2].clip_id]
    with pytest.raises(DataError):
        list(ds.iter_samples(skip_errors=False))
    # with allow_pickle the upstream file is accepted (no width/height stored: 640x480 assumed)
    trusted = ClipDataset(d, max_questions=10, allow_pickle=True)
    errs: list = []
    assert len(list(trusted.iter_samples(errors=errs))) == 20 and len(errs) == 20
    with pytest.raises(DataError, match="--allow_pickle"):
        load_event_frames(ds[20], 3)
    assert len(load_event_frames(ds[20], 3, allow_pickle=True)) == 3


def test_extracted_frames_stand_in_for_a_deleted_mp4(tiny_dataset, tmp_path) -> None:  # noqa: F811
    """A copy without its mp4 files (frames already extracted) still validates and reads."""
    d = tmp_path / "no_mp4"
    shutil.copytree(tiny_dataset, d)
    shutil.rmtree(d / "mp4")
    ds = ClipDataset(d, max_questions=1)
    errors: list = []
    assert len(list(ds.iter_samples(deep=False, errors=errors))) == len(ds) and errors == []
    assert len(list(ds.iter_samples(errors=errors))) == len(ds) and errors == []


def test_event_source_reaches_records_and_config(tiny_models_dir, tiny_dataset, tmp_path) -> None:  # noqa: F811
    """--event_source images: the benchmark's record and config.json say so; frames equal the rendered ones."""
    import benchmark_inference.benchmark_inference as bi

    argv = ["--dataset_dir", str(tiny_dataset), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
            "--videollava_path", str(tiny_models_dir / "videollava"), "--output_dir", str(tmp_path),
            "--max_new_tokens", "4", "--gamma", "2", "--warmup_steps", "0", "--max_samples", "1",
            "--event_source", "images"]
    run = Path(bi.main(argv)["run_dir"])
    record = json.loads((run / "results.json").read_text())["samples"][0]
    assert record["event_source"] == "images" and "error" not in record
    assert record["event_data"] == str(ClipDataset(tiny_dataset)[0].event_path)
    assert json.loads((run / "config.json").read_text())["args"]["event_source"] == "images"
    default = bi.build_parser().parse_args([])
    assert default.event_source == "events"
