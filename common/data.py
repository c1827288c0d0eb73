"""Clip datasets (DSEC-derived or synthetic): index JSON, questions, event frames and video frames.

A dataset folder holds ``EventGPT_Instruction_Subset.json`` plus event_npy/, mp4/, video/,
event_image/, event_image_1f/ and, for synthetic data, ground_truth/. See ``ClipDataset``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.events import load_events, render_event_frames, render_event_image
from common.synthetic import answer_question, load_top_questions
from common.video import FrameCache, count_mp4_frames, read_mp4_frames, sample_frame_indices

__all__ = [
    "INDEX_NAME",
    "ClipSample",
    "ClipDataset",
    "strip_question",
    "load_questions",
    "load_event_frames",
    "load_video_frames",
    "default_frame_cache",
    "read_image",
]

INDEX_NAME = "EventGPT_Instruction_Subset.json"
_MAKE_HINT = "make one with: python -m scripts.make_synthetic_dataset --output_dir DIR --num_clips N"


@dataclass
class ClipSample:
    """One (clip, question) pair; paths are absolute (None when the index has no such file)."""

    id: str
    split: str
    question: str
    answer: str | None
    clip_id: str
    event_path: Path | None
    video_path: Path | None
    frames_dir: Path | None
    event_image_paths: list[Path] = field(default_factory=list)
    event_image_1f_path: Path | None = None
    dataset_dir: Path = Path(".")
    ground_truth_path: Path | None = None
    # how the data source reads this sample: trust pickled .npy events; the mp4 frame cache (None: decode)
    allow_pickle: bool = False
    frame_cache: FrameCache | None = field(default=None, repr=False, compare=False)


def strip_question(text: str) -> str:
    """The question without the ``<event>`` placeholder and surrounding whitespace."""
    return text.replace("<event>", "").strip()


def load_questions(dataset_dir: str | os.PathLike | None = None,
                   questions_file: str | os.PathLike | None = None) -> list[dict]:
    """Top questions [{"question", "count"}], most frequent first.

    ``questions_file`` wins; else DIR/top50_questions.json; else the copy shipped in common/.
    """
    path = Path(questions_file) if questions_file else None
    if path is None and dataset_dir is not None and (Path(dataset_dir) / "top50_questions.json").is_file():
        path = Path(dataset_dir) / "top50_questions.json"
    if path is not None and not path.is_file():
        raise DataError(f"{path}: questions file not found; pass an existing --questions_file")
    try:
        return load_top_questions(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable questions file ({exc}); it must be a JSON list of "
                        '{"question": str, "count": int}') from exc


def _resolve(dataset_dir: Path, rel: str | None) -> Path | None:
    if not rel:
        return None
    path = dataset_dir / rel
    if path.suffix in (".npy", ".npz") and not path.exists():
        alt = path.with_suffix(".npz" if path.suffix == ".npy" else ".npy")
        if alt.exists():
            return alt
    return path


def _question_answer(entry: dict) -> tuple[str, str | None]:
    question, answer = None, None
    for turn in entry.get("conversations", []):
        if turn.get("from") == "human" and question is None:
            question = strip_question(str(turn.get("value", "")))
        elif turn.get("from") == "gpt" and answer is None:
            answer = str(turn.get("value", ""))
    if question is None:
        raise KeyError("no human turn in conversations")
    return question, answer


class ClipDataset:
    """The samples of a clip dataset folder.

    ``max_questions=1`` gives one sample per index entry with the entry's own question and answer;
    ``max_questions=N > 1`` gives N samples per entry, one per top-N question (answers from the
    synthetic ground truth when present, else None). Sample ids: "{entry_id}" or "{entry_id}_q{k}".
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str | None = None, max_questions: int = 1,
                 questions_file: str | os.PathLike | None = None, allow_pickle: bool = False,
                 frame_cache_dir: str | os.PathLike | None = None) -> None:
        self.dataset_dir = Path(dataset_dir).resolve()
        self.split = split
        self.max_questions = int(max_questions)
        self.allow_pickle = allow_pickle
        self.frame_cache = FrameCache(frame_cache_dir) if frame_cache_dir is not None else None
        index = self.dataset_dir / INDEX_NAME
        if not index.is_file():
            raise DataError(f"{index}: dataset index not found; {_MAKE_HINT}")
        try:
            entries = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{index}: unreadable index JSON ({exc}); regenerate the dataset") from exc
        if not isinstance(entries, list):
            raise DataError(f"{index}: index must be a JSON list of clip entries; regenerate the dataset")
        if split is not None:
            splits = sorted({str(e.get("split")) for e in entries})
            entries = [e for e in entries if e.get("split") == split]
            if not entries:
                raise DataError(f"{index}: no entries with split {split!r} (splits present: {splits}); "
                                "pick another --split or generate that split")
        if self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1, got {max_questions}")
        self.questions: list[str] = []
        if self.max_questions > 1:
            top = load_questions(self.dataset_dir, questions_file)
            if self.max_questions > len(top):
                raise DataError(f"questions file has {len(top)} questions, fewer than max_questions="
                                f"{self.max_questions}; lower --max_questions")
            self.questions = [q["question"] for q in top[: self.max_questions]]
        self.entries = entries
        self.samples: list[ClipSample] = []
        for entry in entries:
            self.samples.extend(self._samples_of(entry, index))
        self._ground_truth: dict[Path, dict] = {}

    def _samples_of(self, entry: dict, index: Path) -> list[ClipSample]:
        d = self.dataset_dir
        try:
            entry_id = str(entry["id"])
            own_q, own_a = _question_answer(entry)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{index}: malformed entry {str(entry)[:80]!r} ({exc}); regenerate the index") from exc
        event_path = _resolve(d, entry.get("event_data"))
        images = [d / p for p in entry.get("event_image", []) or []]
        image_1f = _resolve(d, entry.get("event_image_1f"))
        if image_1f is None and event_path is not None:
            image_1f = d / "event_image_1f" / event_path.parent.name / f"{event_path.stem}_0.png"
        gt = _resolve(d, entry.get("ground_truth"))
        if gt is None and event_path is not None:
            candidate = d / "ground_truth" / event_path.parent.name / f"{event_path.stem}.json"
            gt = candidate if candidate.is_file() else None
        common = dict(
            split=str(entry.get("split", "")), clip_id=entry_id, event_path=event_path,
            video_path=_resolve(d, entry.get("mp4_data")), frames_dir=_resolve(d, entry.get("video_data")),
            event_image_paths=images, event_image_1f_path=image_1f, dataset_dir=d, ground_truth_path=gt,
            allow_pickle=self.allow_pickle, frame_cache=self.frame_cache,
        )
        if self.max_questions == 1:
            return [ClipSample(id=entry_id, question=own_q, answer=own_a, **common)]
        return [ClipSample(id=f"{entry_id}_q{k}", question=q, answer=None, **common)
                for k, q in enumerate(self.questions)]

    def _answer(self, sample: ClipSample) -> str | None:
        if sample.answer is not None or sample.ground_truth_path is None:
            return sample.answer
        gt = self._ground_truth.get(sample.ground_truth_path)
        if gt is None:
            try:
                gt = json.loads(sample.ground_truth_path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{sample.ground_truth_path}: unreadable ground truth ({exc}); "
                                "regenerate the synthetic dataset") from exc
            self._ground_truth[sample.ground_truth_path] = gt
        return answer_question(sample.question, gt)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> ClipSample:
        sample = self.samples[i]
        if sample.answer is None and sample.ground_truth_path is not None:
            sample.answer = self._answer(sample)
        return sample

    def __iter__(self) -> Iterator[ClipSample]:
        for i in range(len(self)):
            yield self[i]

    def validate(self, sample: ClipSample, deep: bool = True) -> None:
        """Raise DataError if the sample's files are missing or (``deep``) unreadable."""
        if sample.event_path is None:
            raise DataError(f"{sample.dataset_dir / INDEX_NAME}: entry {sample.clip_id} has no event_data; "
                            "fix the index")
        if sample.video_path is None and sample.frames_dir is None:
            raise DataError(f"{sample.dataset_dir / INDEX_NAME}: entry {sample.clip_id} has no mp4_data or "
                            "video_data; fix the index")
        if not deep:
            video = sample.video_path
            has_frames = sample.frames_dir is not None and sample.frames_dir.is_dir()
            for path in [sample.event_path, None if has_frames else video]:  # extracted frames replace the mp4
                if path is not None and not path.exists():
                    raise DataError(f"{path}: file not found; check the dataset index or regenerate the clip")
            return
        load_events(sample.event_path, allow_pickle=self.allow_pickle)
        if sample.video_path is not None and (sample.video_path.exists() or sample.frames_dir is None):
            if count_mp4_frames(sample.video_path) < 1:
                raise DataError(f"{sample.video_path}: mp4 has no frames; re-encode or regenerate the clip")
        elif sample.frames_dir is not None and not any(sample.frames_dir.glob("*.png")):
            raise DataError(f"{sample.frames_dir}: no frame PNGs found; regenerate the clip")

    def iter_samples(self, skip_errors: bool = True, errors: list | None = None,
                     deep: bool = True) -> Iterator[ClipSample]:
        """Iterate over samples whose files validate; bad ones are recorded as (id, message) in
        ``errors`` and skipped (or the DataError is raised when ``skip_errors`` is False).
        A clip's files are checked once, however many questions it has."""
        checked: dict[str, str | None] = {}
        for i in range(len(self)):
            sample = self.samples[i]
            if sample.clip_id not in checked:
                try:
                    self.validate(sample, deep=deep)
                    checked[sample.clip_id] = None
                except DataError as exc:
                    if not skip_errors:
                        raise
                    checked[sample.clip_id] = str(exc)
            message = checked[sample.clip_id]
            if message is not None:
                if errors is not None:
                    errors.append((sample.id, message))
                continue
            try:
                yield self[i]
            except DataError as exc:
                if not skip_errors:
                    raise
                if errors is not None:
                    errors.append((sample.id, str(exc)))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; DataError if missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found; regenerate the clip's images")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({exc}); regenerate the clip's images") from exc


def load_event_frames(sample: ClipSample, num_frames: int = 5, allow_pickle: bool | None = None) -> list[np.ndarray]:
    """Event images (HxWx3 uint8 RGB) of a sample: the stored PNGs when they match ``num_frames``
    (event_image_1f for 1), else rendered from the events file (equal-count chunks).
    ``allow_pickle`` None: the sample's own setting (its dataset's)."""
    if num_frames == 1 and sample.event_image_1f_path is not None and sample.event_image_1f_path.is_file():
        return [read_image(sample.event_image_1f_path)]
    paths = sample.event_image_paths
    if num_frames > 1 and len(paths) == num_frames and all(p.is_file() for p in paths):
        return [read_image(p) for p in paths]
    if sample.event_path is None:
        raise DataError(f"{sample.dataset_dir / INDEX_NAME}: sample {sample.id} has no event images for "
                        f"{num_frames} frames and no events file; fix the index")
    stream = load_events(sample.event_path, allow_pickle=sample.allow_pickle if allow_pickle is None else allow_pickle)
    if num_frames == 1:
        return [render_event_image(stream)]
    return render_event_frames(stream, num_frames)


def load_video_frames(sample: ClipSample, num_frames: int = 8, cache: FrameCache | None = None) -> np.ndarray:
    """(num_frames, H, W, 3) uint8 RGB video frames: the mp4 (through ``cache``, default the sample's
    frame cache, when there is one), else the frame PNG folder, sampled as Video-LLaVA does."""
    cache = cache if cache is not None else sample.frame_cache
    if sample.video_path is not None and sample.video_path.is_file():
        if cache is not None:
            return cache.get(sample.video_path, num_frames)
        return read_mp4_frames(sample.video_path, num_frames)
    if sample.frames_dir is not None and sample.frames_dir.is_dir():
        pngs = sorted(sample.frames_dir.glob("*.png"))
        if len(pngs) < num_frames:
            raise DataError(f"{sample.frames_dir}: only {len(pngs)} frame PNGs, need {num_frames}; "
                            "regenerate the clip")
        return np.stack([read_image(pngs[i]) for i in sample_frame_indices(len(pngs), num_frames).tolist()])
    missing = sample.video_path or sample.frames_dir or sample.dataset_dir / INDEX_NAME
    raise DataError(f"{missing}: no mp4 and no frame folder for sample {sample.id}; regenerate the clip")


def default_frame_cache(dataset_dir: str | os.PathLike) -> FrameCache:
    """The frame cache at DIR/.frame_cache."""
    return FrameCache(Path(dataset_dir) / ".frame_cache")
