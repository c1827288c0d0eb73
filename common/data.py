"""Clip datasets (DSEC-derived or synthetic): index JSON, questions, event frames and video frames.

A dataset folder holds ``EventGPT_Instruction_Subset.json`` plus event_npy/, mp4/, video/,
event_image/, event_image_1f/ and, for synthetic data, ground_truth/. See ``ClipDataset``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.events import load_events, render_event_frames, render_event_image
from common.synthetic import answer_question, load_top_questions
from common.video import (
    MAX_FRAME_PIXELS,
    FrameCache,
    check_frame_size,
    count_mp4_frames,
    read_mp4_frames,
    sample_frame_indices,
)

__all__ = [
    "INDEX_NAME",
    "EVENT_SOURCES",
    "DEFAULT_EVENT_SOURCE",
    "IMAGE_AGREEMENT_TOLERANCE",
    "ClipSample",
    "ClipDataset",
    "strip_question",
    "load_questions",
    "load_event_frames",
    "load_video_frames",
    "default_frame_cache",
    "warm_frame_cache",
    "read_image",
    "sample_fields",
    "event_images_disagreement",
    "check_event_images",
]

log = logging.getLogger(__name__)

INDEX_NAME = "EventGPT_Instruction_Subset.json"
_MAKE_HINT = "make one with: python -m scripts.make_synthetic_dataset --output_dir DIR --num_clips N"
# Where EventGPT's event frames come from: rendered from the events file, or the stored event PNGs.
EVENT_SOURCES = ("events", "images")
DEFAULT_EVENT_SOURCE = "events"
# Stored event PNGs "agree" with the events when the sets of pixels that events touched (non-white)
# differ in at most this fraction of their union. Any renderer that draws each event on a white
# canvas touches exactly the same pixels (whatever its colours or which polarity wins), and PNG is
# lossless, so the only slack needed is for a renderer that places the equal-count chunk boundaries
# a few events differently; PNGs of another clip or time window differ in far more (tests: > 20%).
IMAGE_AGREEMENT_TOLERANCE = 0.01
_PATH_FIELDS = ("event_data", "video_data", "mp4_data", "event_image_1f", "ground_truth")


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
    event_source: str = DEFAULT_EVENT_SOURCE
    # results of checks done once per clip, shared by the clip's samples (see load_event_frames)
    clip_checks: dict = field(default_factory=dict, repr=False, compare=False)
    # how the data source reads this sample: trust pickled .npy events; the mp4 frame cache (None: decode)
    allow_pickle: bool = False
    frame_cache: FrameCache | None = field(default=None, repr=False, compare=False)

    @property
    def index_path(self) -> Path:
        """The index JSON this sample comes from."""
        return self.dataset_dir / INDEX_NAME


def sample_fields(sample: ClipSample) -> dict:
    """The fields every per-sample record starts with: id, split, query, event_data, video_data, event_source."""
    return {
        "id": sample.id, "split": sample.split, "query": sample.question,
        "event_data": str(sample.event_path) if sample.event_path else None,
        "video_data": str(sample.video_path or sample.frames_dir),
        "event_source": sample.event_source,
    }


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


class _Entry:
    """One index entry being turned into samples: names it in errors and resolves its paths safely."""

    def __init__(self, index: Path, dataset_dir: Path, entry, position: int,
                 real_dirs: dict[str, str] | None = None) -> None:
        self.index, self.dir, self.entry = index, dataset_dir, entry
        self.root = str(dataset_dir)  # already resolved
        self.real_dirs = {} if real_dirs is None else real_dirs
        self.name = f"#{position}"
        if not isinstance(entry, dict):
            raise self.error(f"is a {type(entry).__name__}, expected an object with id, conversations and paths")
        if isinstance(entry.get("id"), (str, int)) and not isinstance(entry.get("id"), bool):
            self.name = repr(str(entry["id"]))
        self.check_types()

    def error(self, problem: str, fix: str = "fix the index or regenerate the dataset") -> DataError:
        return DataError(f"{self.index}: entry {self.name} {problem}; {fix}")

    def check_types(self) -> None:
        """DataError naming the field when a field has the wrong JSON type."""
        e = self.entry
        if "id" not in e:
            raise self.error("has no id")
        if isinstance(e["id"], bool) or not isinstance(e["id"], (str, int)):
            raise self.error(f"field 'id' is a {type(e['id']).__name__}, expected a string")
        for key in ("split", *_PATH_FIELDS):
            if e.get(key) is not None and not isinstance(e[key], str):
                raise self.error(f"field {key!r} is a {type(e[key]).__name__} ({str(e[key])[:40]}), expected a "
                                 "path string relative to the dataset folder")
        images = e.get("event_image")
        if images is not None and not (isinstance(images, list) and all(isinstance(x, str) for x in images)):
            raise self.error(f"field 'event_image' is {str(images)[:40]!r}, expected a list of path strings")
        turns = e.get("conversations")
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in turns):
            raise self.error(f"field 'conversations' is {str(turns)[:40]!r}, expected a list of "
                             '{"from": "human"|"gpt", "value": str}')

    def path(self, key: str, rel: str | None) -> Path | None:
        """DIR/rel, refused (DataError) when absolute or when it or its link target leaves DIR."""
        if not rel:
            return None
        if os.path.isabs(rel):
            raise self.error(f"{key} {rel!r} is an absolute path (nothing outside the dataset folder {self.dir} "
                             "is read)", "make the path relative to the dataset folder")
        path = os.path.normpath(os.path.join(self.root, rel))
        stem, suffix = os.path.splitext(path)
        if suffix in (".npy", ".npz") and not os.path.exists(path):
            alt = stem + (".npz" if suffix == ".npy" else ".npy")
            path = alt if os.path.exists(alt) else path
        return self.inside(key, path, rel)

    def inside(self, key: str, path: str | Path, shown: str | None = None) -> Path:
        """``path`` when it, resolved through links, stays inside the dataset folder; else DataError.
        Folders are resolved once per dataset (``real_dirs``), files with one lstat."""
        path = str(path)
        parent, name = os.path.split(path)
        real_parent = self.real_dirs.get(parent)
        if real_parent is None:
            real_parent = self.real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise self.error(f"{key} {shown or path!r} leads to {real}, outside the dataset folder {self.dir} "
                             "(nothing outside it is read)",
                             "copy the file into the dataset folder and use a relative path without '..'")
        return Path(path)


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
                 frame_cache_dir: str | os.PathLike | None = None,
                 event_source: str = DEFAULT_EVENT_SOURCE) -> None:
        if event_source not in EVENT_SOURCES:
            raise ValueError(f"event_source must be one of {EVENT_SOURCES}, got {event_source!r}")
        self.dataset_dir = Path(dataset_dir).resolve()
        self.split = split
        self.max_questions = int(max_questions)
        self.allow_pickle = allow_pickle
        self.event_source = event_source
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
        # entries of other splits are left alone, but every entry must be an object to have a split
        real_dirs: dict[str, str] = {}
        checked = [_Entry(index, self.dataset_dir, e, i, real_dirs) for i, e in enumerate(entries)
                   if split is None or not isinstance(e, dict) or e.get("split") == split]
        if split is not None:
            splits = sorted({str(e.get("split")) for e in entries})
            entries = [c.entry for c in checked]
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
        for entry in checked:
            self.samples.extend(self._samples_of(entry))
        self._ground_truth: dict[Path, dict] = {}

    def _samples_of(self, checked: _Entry) -> list[ClipSample]:
        d, entry = self.dataset_dir, checked.entry
        try:
            entry_id = str(entry["id"])
            own_q, own_a = _question_answer(entry)
        except KeyError as exc:
            raise checked.error("has no human turn in 'conversations'") from exc
        event_path = checked.path("event_data", entry.get("event_data"))
        images = [checked.path("event_image", p) for p in entry.get("event_image", []) or []]
        image_1f = checked.path("event_image_1f", entry.get("event_image_1f"))
        if image_1f is None and event_path is not None:
            image_1f = checked.inside("event_image_1f",
                                      d / "event_image_1f" / event_path.parent.name / f"{event_path.stem}_0.png")
        gt = checked.path("ground_truth", entry.get("ground_truth"))
        if gt is None and event_path is not None:
            candidate = d / "ground_truth" / event_path.parent.name / f"{event_path.stem}.json"
            gt = checked.inside("ground_truth", candidate) if candidate.is_file() else None
        common = dict(
            split=str(entry.get("split", "")), clip_id=entry_id, event_path=event_path,
            video_path=checked.path("mp4_data", entry.get("mp4_data")),
            frames_dir=checked.path("video_data", entry.get("video_data")),
            event_image_paths=images, event_image_1f_path=image_1f, dataset_dir=d, ground_truth_path=gt,
            event_source=self.event_source, clip_checks={},
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
        index = sample.index_path
        images = [*sample.event_image_paths, *([sample.event_image_1f_path] if sample.event_image_1f_path else [])]
        if sample.event_source == "events" and sample.event_path is None:
            raise DataError(f"{index}: entry {sample.clip_id} has no event_data; fix the index "
                            "or read its event PNGs with --event_source images")
        if sample.event_source == "images" and not any(p.is_file() for p in images):
            raise DataError(f"{index}: entry {sample.clip_id} has no event PNGs (event_image / event_image_1f); "
                            "regenerate them or use --event_source events")
        if sample.video_path is None and sample.frames_dir is None:
            raise DataError(f"{index}: entry {sample.clip_id} has no mp4_data or video_data; fix the index")
        if not deep:
            video = sample.video_path
            has_frames = sample.frames_dir is not None and sample.frames_dir.is_dir()
            event_files = [sample.event_path] if sample.event_source == "events" else sample.event_image_paths
            for path in [*event_files, None if has_frames else video]:  # extracted frames replace the mp4
                if path is not None and not path.exists():
                    raise DataError(f"{path}: file not found; check the dataset index or regenerate the clip")
            return
        if sample.event_source == "events":
            load_events(sample.event_path, allow_pickle=self.allow_pickle)
        else:
            for path in images:
                if path.is_file():
                    read_image(path)
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
    """An image file as HxWx3 uint8 RGB; DataError if missing, unreadable or larger than
    MAX_FRAME_PIXELS (checked on the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found; regenerate the clip's images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            with Image.open(path) as img:
                check_frame_size(path, *img.size, what="image")
                return np.asarray(img.convert("RGB"))
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image size is far outside the limit of {MAX_FRAME_PIXELS} pixels (PIL: {exc}); "
                        "downscale the images or regenerate the clip") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({exc}); regenerate the clip's images") from exc


def _stored_event_images(sample: ClipSample, num_frames: int) -> list[Path] | None:
    """The stored event PNGs for ``num_frames`` frames (event_image_1f for 1), or None if absent."""
    if num_frames == 1 and sample.event_image_1f_path is not None and sample.event_image_1f_path.is_file():
        return [sample.event_image_1f_path]
    paths = sample.event_image_paths
    if num_frames > 1 and len(paths) == num_frames and all(p.is_file() for p in paths):
        return list(paths)
    return None


def _render(stream, num_frames: int) -> list[np.ndarray]:
    return [render_event_image(stream)] if num_frames == 1 else render_event_frames(stream, num_frames)


def event_images_disagreement(stored: list[np.ndarray], rendered: list[np.ndarray]) -> str | None:
    """None when stored event images show the pixels the rendering from the events shows (within
    IMAGE_AGREEMENT_TOLERANCE of the touched pixels, frame by frame), else what differs."""
    for k, (a, b) in enumerate(zip(stored, rendered)):
        if a.shape != b.shape:
            return f"frame {k} is {a.shape[1]}x{a.shape[0]} but the events render {b.shape[1]}x{b.shape[0]}"
        touched_a = (a[..., 0] & a[..., 1] & a[..., 2]) != 255  # not white (fast: no reduction over RGB)
        touched_b = (b[..., 0] & b[..., 1] & b[..., 2]) != 255
        union = int((touched_a | touched_b).sum())
        differ = int((touched_a ^ touched_b).sum())
        if differ > IMAGE_AGREEMENT_TOLERANCE * max(union, 1):
            return (f"frame {k}: {differ} of {union} event pixels differ ({100 * differ / max(union, 1):.1f}% > "
                    f"{100 * IMAGE_AGREEMENT_TOLERANCE:.0f}%)")
    return None


def check_event_images(sample: ClipSample, num_frames: int = 5, allow_pickle: bool | None = None,
                       frames: list[np.ndarray] | None = None) -> str | None:
    """Compare a clip's stored event PNGs with a rendering of its events, once per clip and frame count
    (the verdict is shared by the clip's samples); returns the one-line disagreement, or None when
    they agree, one side is absent, or the side not used is unreadable. Under --event_source events
    a disagreement is logged as one warning line. ``frames``: the used side, when already loaded.

    ``load_event_frames`` calls it; a run loop may call it first, outside its timers, so that the
    timed load does not pay for the comparison. ``allow_pickle`` None: the sample's own setting.
    """
    allow_pickle = sample.allow_pickle if allow_pickle is None else allow_pickle
    stored = _stored_event_images(sample, num_frames)
    key = ("event_images_disagree", num_frames)
    if stored is None or sample.event_path is None:
        return None
    if key not in sample.clip_checks:
        problem = None
        try:
            images = frames if frames is not None and sample.event_source == "images" else None
            rendered = frames if frames is not None and sample.event_source == "events" else None
            images = images if images is not None else [read_image(p) for p in stored]
            if rendered is None:
                rendered = _render(load_events(sample.event_path, allow_pickle=allow_pickle), num_frames)
            problem = event_images_disagreement(images, rendered)
        except DataError:
            problem = None  # a side is unreadable: nothing to compare (loading the used side reports it)
        if problem:
            problem = (f"sample {sample.id}: event PNGs {stored[0].parent} disagree with the events "
                       f"{sample.event_path} ({problem})")
            if sample.event_source == "events":
                log.warning("%s; the events are used (--event_source events); regenerate the PNGs", problem)
        sample.clip_checks[key] = problem
    return sample.clip_checks[key]


def load_event_frames(sample: ClipSample, num_frames: int = 5, allow_pickle: bool | None = None) -> list[np.ndarray]:
    """Event images (HxWx3 uint8 RGB) of a sample from its ``event_source``: rendered from the events
    file (equal-count chunks, the default), or the stored PNGs (event_image_1f for 1 frame).

    When both exist they are compared once per clip (``check_event_images``): under events a
    disagreement is a warning (the PNGs are unused, the result is right); under images it is a
    DataError, since the frames would not come from the events file the record names.
    ``allow_pickle`` None: the sample's own setting (its dataset's).
    """
    allow_pickle = sample.allow_pickle if allow_pickle is None else allow_pickle
    stored = _stored_event_images(sample, num_frames)
    if sample.event_source == "images":
        if stored is None:
            raise DataError(f"{sample.index_path}: sample {sample.id} has no stored event PNGs for {num_frames} "
                            "frames; regenerate them or use --event_source events")
        frames = [read_image(p) for p in stored]
    else:
        if sample.event_path is None:
            raise DataError(f"{sample.index_path}: sample {sample.id} has no events file; fix the index "
                            "or use --event_source images")
        frames = _render(load_events(sample.event_path, allow_pickle=allow_pickle), num_frames)
    problem = check_event_images(sample, num_frames, allow_pickle, frames)
    if problem and sample.event_source == "images":
        raise DataError(f"{problem}; the PNGs were not rendered from these events: regenerate them "
                        "or use --event_source events")
    return frames


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
        chosen = [pngs[i] for i in sample_frame_indices(len(pngs), num_frames).tolist()]
        root = sample.dataset_dir.resolve()
        for png in chosen:
            if not png.resolve().is_relative_to(root):
                raise DataError(f"{png}: frame PNG of sample {sample.id} links to {png.resolve()}, outside the "
                                f"dataset folder {root}; copy the frame into the dataset folder")
        return np.stack([read_image(p) for p in chosen])
    missing = sample.video_path or sample.frames_dir or sample.dataset_dir / INDEX_NAME
    raise DataError(f"{missing}: no mp4 and no frame folder for sample {sample.id}; regenerate the clip")


def warm_frame_cache(sample: ClipSample, num_frames: int = 8) -> bool:
    """Decode the sample's mp4 into its frame cache unless cached already (untimed benchmark set-up; a
    cached entry is not read); True when the sample has an mp4 and a frame cache."""
    if sample.frame_cache is None or sample.video_path is None or not sample.video_path.is_file():
        return False
    sample.frame_cache.ensure(sample.video_path, num_frames)
    return True


def default_frame_cache(dataset_dir: str | os.PathLike) -> FrameCache:
    """The frame cache at DIR/.frame_cache."""
    return FrameCache(Path(dataset_dir) / ".frame_cache")
