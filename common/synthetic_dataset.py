"""Write a synthetic clip dataset in the DSEC clip layout (events, mp4, frames, event images, Q&A).

The library behind ``python -m scripts.make_synthetic_dataset`` and the embedded default
dataset (common.defaults)::

    write_synthetic_dataset("data/synthetic_1s", num_clips=100, duration="1s", split="test", seed=0)

Clips are grouped in sequences of 10 (synthetic_{split}_seq_000, ...). Each clip's seed comes from
(seed, split, clip index), so output bytes do not depend on ``num_workers``. Finished clips are
skipped on a rerun (resumable); the index JSON merges with an existing one, so train and test can
share a folder, and an existing id with different content is refused.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import INDEX_NAME
from common.errors import DataError
from common.events import (
    MAX_SENSOR_SIDE,
    atomic_write_bytes,
    render_event_frames,
    render_event_image,
    save_events_npz,
)
from common.synthetic import answer_question, generate_clip, load_top_questions, long_answer_questions
from common.video import encode_mp4_bytes

DURATIONS_MS = {"1s": 1000, "500ms": 500}
CLIPS_PER_SEQUENCE = 10
FPS = 20


def _clip_names(split: str, index: int) -> tuple[str, str, str]:
    seq = f"synthetic_{split}_seq_{index // CLIPS_PER_SEQUENCE:03d}"
    clip = f"{index % CLIPS_PER_SEQUENCE:06d}"
    return seq, clip, f"{seq}_{clip}"


def _clip_paths(split: str, index: int) -> dict:
    seq, clip, _ = _clip_names(split, index)
    return {
        "event_data": f"event_npy/{seq}/{clip}.npz",
        "video_data": f"video/{seq}/{clip}",
        "mp4_data": f"mp4/{seq}/{clip}.mp4",
        "event_image": [f"event_image/{seq}/{clip}_{k}.png" for k in range(5)],
        "event_image_1f": f"event_image_1f/{seq}/{clip}_0.png",
        "ground_truth": f"ground_truth/{seq}/{clip}.json",
    }


def _seed_sequence(seed: int, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])


def _png_bytes(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _entry(split: str, index: int, gt: dict, questions: list[dict], seed: int) -> dict:
    rng = np.random.default_rng(_seed_sequence(seed, split, index).spawn(3)[2])
    counts = np.array([q["count"] for q in questions], dtype=np.float64)
    question = questions[int(rng.choice(len(questions), p=counts / counts.sum()))]["question"]
    _, _, clip_id = _clip_names(split, index)
    paths = _clip_paths(split, index)
    return {
        "id": clip_id, "split": split,
        "event_data": paths["event_data"], "video_data": paths["video_data"], "mp4_data": paths["mp4_data"],
        "event_image": paths["event_image"], "event_image_1f": paths["event_image_1f"],
        "ground_truth": paths["ground_truth"],
        "conversations": [{"from": "human", "value": f"<event>\n{question}"},
                          {"from": "gpt", "value": answer_question(question, gt)}],
    }


def _make_clip(job: dict) -> tuple[dict, bool]:
    """Generate (or skip, when all files exist) one clip; returns (index entry, generated?)."""
    out = Path(job["output_dir"])
    split, index, seed = job["split"], job["index"], job["seed"]
    paths = _clip_paths(split, index)
    num_frames = job["duration_ms"] * FPS // 1000
    files = [paths["event_data"], paths["mp4_data"], paths["event_image_1f"], paths["ground_truth"],
             *paths["event_image"], *[f"{paths['video_data']}/{k:04d}.png" for k in range(num_frames)]]
    if all((out / f).is_file() for f in files):
        try:
            gt = json.loads((out / paths["ground_truth"]).read_text())
            return _entry(split, index, gt, job["questions"], seed), False
        except (ValueError, KeyError, TypeError):
            pass  # a damaged ground truth: generate the clip again
    ss = _seed_sequence(seed, split, index)
    gt, frames, events = generate_clip(ss.spawn(3)[0], job["width"], job["height"], job["duration_ms"], FPS,
                                       job["noise_rate"], job["ego_motion"], job["threshold"])
    if job.get("long_answers"):
        gt["answer_style"] = "long"
    for k, frame in enumerate(frames):
        atomic_write_bytes(out / f"{paths['video_data']}/{k:04d}.png", _png_bytes(frame))
    for path, img in zip(paths["event_image"], render_event_frames(events, 5)):
        atomic_write_bytes(out / path, _png_bytes(img))
    atomic_write_bytes(out / paths["event_image_1f"], _png_bytes(render_event_image(events)))
    atomic_write_bytes(out / paths["mp4_data"], encode_mp4_bytes(frames, FPS))
    save_events_npz(out / paths["event_data"], events)
    # ground truth last: its presence marks a finished clip
    atomic_write_bytes(out / paths["ground_truth"], (json.dumps(gt, indent=1) + "\n").encode())
    return _entry(split, index, gt, job["questions"], seed), True


def _merge_index(index_path: Path, new_entries: list[dict]) -> list[dict]:
    existing = []
    if index_path.is_file():
        try:
            existing = json.loads(index_path.read_text())
        except ValueError as exc:
            raise DataError(f"{index_path}: unreadable existing index ({exc}); move it away and rerun") from exc
    if not isinstance(existing, list) or not all(isinstance(e, dict) and isinstance(e.get("id"), str)
                                                 for e in existing):
        raise DataError(f"{index_path}: existing index is not a list of entries with string ids; "
                        "move it away and rerun")
    by_id = {e["id"]: e for e in existing}
    merged = list(existing)
    for entry in new_entries:
        old = by_id.get(entry["id"])
        if old is None:
            merged.append(entry)
            by_id[entry["id"]] = entry
        elif old != entry:
            raise DataError(f"{index_path}: entry {entry['id']} already exists with different content "
                            "(other seed, duration or size?); use another --output_dir")
    return merged


def default_num_workers() -> int:
    """Processes generating clips when none are asked for: 2 or the core count."""
    return min(2, os.cpu_count() or 1)


def write_synthetic_dataset(output_dir: str | Path, *, num_clips: int = 20, duration: str = "1s",
                            split: str = "test", seed: int = 0, width: int = 640, height: int = 480,
                            num_workers: int | None = None, noise_rate: float = 0.002, ego_motion: bool = True,
                            threshold: float = 0.2, long_answers: bool = False) -> dict:
    """Generate (or complete) ``num_clips`` clips of ``split`` in ``output_dir``; returns a summary dict
    (counts, timing, index path). ``duration`` is one of DURATIONS_MS; width and height must be even
    and within the event loader's sensor limit. ``long_answers``: multi-sentence answers (common.synthetic)."""
    from tqdm import tqdm

    if width % 2 or height % 2:
        raise DataError(f"frame size {width}x{height}: width and height must be even (yuv420p video)")
    if not (2 <= width <= MAX_SENSOR_SIDE and 2 <= height <= MAX_SENSOR_SIDE):
        raise DataError(f"frame size {width}x{height}: width and height must be in 2..{MAX_SENSOR_SIDE} "
                        "(the event loader's sensor limit)")
    if num_clips < 1 or (num_workers is not None and num_workers < 1):
        raise DataError(f"num_clips {num_clips}, num_workers {num_workers}: both must be >= 1")
    if duration not in DURATIONS_MS:
        raise DataError(f"duration {duration!r}: choose one of {sorted(DURATIONS_MS)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_top_questions()
    jobs = [dict(output_dir=str(out), split=split, index=i, seed=seed, width=width, height=height,
                 duration_ms=DURATIONS_MS[duration], noise_rate=noise_rate, ego_motion=ego_motion,
                 threshold=threshold, questions=questions, long_answers=long_answers)
            for i in range(num_clips)]
    start = time.perf_counter()
    results: list[tuple[dict, bool]] = []
    workers = max(1, min(num_workers or default_num_workers(), len(jobs)))
    progress = tqdm(total=len(jobs), desc=f"synthetic {split}", unit="clip")
    if workers == 1:
        for job in jobs:
            results.append(_make_clip(job))
            progress.update()
    else:
        with get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_make_clip, jobs):
                results.append(result)
                progress.update()
    progress.close()
    seconds = time.perf_counter() - start
    index_path = out / INDEX_NAME
    questions_path = out / "top50_questions.json"
    if long_answers and not questions_path.is_file():  # ask the long-answer questions the top 50 lack too
        atomic_write_bytes(questions_path, (json.dumps(long_answer_questions(), indent=1) + "\n").encode())
    merged = _merge_index(index_path, [entry for entry, _ in results])
    atomic_write_bytes(index_path, (json.dumps(merged, indent=2) + "\n").encode())
    generated = sum(1 for _, made in results if made)
    return {
        "output_dir": str(out), "index": str(index_path), "split": split, "duration": duration,
        "num_clips": len(jobs), "generated": generated, "skipped": len(jobs) - generated,
        "num_entries": len(merged), "seconds": round(seconds, 3),
        "seconds_per_generated_clip": round(seconds / generated, 3) if generated else None,
        "num_workers": workers,
    }
