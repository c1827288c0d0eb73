"""Token-pair files: JSON Lines written as samples finish, merged by sample id, split by clip.

A token file holds one JSON object per line. In ``--parallel`` extraction every line is a
complete record; sequential extraction (one model loaded at a time) appends *parts* of a
record (the draft's answer first, later the target's answer, then the draft's teacher-forced
predictions) and, once every sample has every part, compacts the file into complete records.
Readers always merge lines by ``id``, so both forms read the same.

A complete record has (besides bookkeeping): ``id, clip_id, split, question, query,
egpt_prompt, videollava_prompt, egpt_token_ids, videollava_token_ids, egpt_tf_token_ids,
egpt, videollava`` (texts), ``egpt_time, videollava_time`` and the vocabulary sizes.
``*_token_ids`` hold generated tokens only (no prompt); ``egpt_tf_token_ids[j]`` is the draft's
greedy next token at position j of the *target's* answer (teacher forced on the target prefix),
which is exactly what a live draft model proposes there.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.results import (  # noqa: F401  (append_jsonl, read_jsonl re-exported)
    append_jsonl,
    atomic_write_text,
    dumps_json,
    read_jsonl,
)
from common.results import file_lock as common_file_lock

# Which keys each extraction part writes (the part is complete when all are present).
DRAFT_KEYS = ("egpt_token_ids",)
TARGET_KEYS = ("videollava_token_ids",)
DRAFT_TF_KEYS = ("egpt_tf_token_ids",)
COMPLETE_KEYS = DRAFT_KEYS + TARGET_KEYS + DRAFT_TF_KEYS


def merge_parts(lines: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    """Merge record parts by ``id`` (later keys win), keeping first-seen order."""
    merged: dict[str, dict] = {}
    for line in lines:
        if "id" not in line:
            continue
        merged.setdefault(str(line["id"]), {}).update(line)
    return merged


def is_complete(record: Mapping[str, Any]) -> bool:
    """Whether a merged record has the draft answer, the target answer and the draft's teacher-forced ids."""
    return all(k in record for k in COMPLETE_KEYS)


def compact(path: str | Path, order: Sequence[str] | None = None) -> int:
    """Rewrite ``path`` atomically with one merged line per id (in ``order`` first); returns the line count."""
    path = Path(path)
    merged = merge_parts(read_jsonl(path))
    ids = [i for i in (order or []) if i in merged]
    ids += [i for i in merged if i not in set(ids)]
    text = "".join(dumps_json(merged[i], indent=None) + "\n" for i in ids)
    atomic_write_text(path, text)
    return len(ids)


def merge_files(paths: Sequence[str | Path],
                missing: str = "token file not found; run python -m token_alignment.extract_tokens first",
                ) -> dict[str, dict]:
    """Records merged per id over several token files (shards), in file order; a missing file raises ``missing``."""
    merged: dict[str, dict] = {}
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: {missing}")
        for rid, rec in merge_parts(read_jsonl(p)).items():
            merged.setdefault(rid, {}).update(rec)
    return merged


def load_token_pairs(paths: str | Path | Sequence[str | Path], complete_only: bool = True) -> list[dict]:
    """Merged records of one or more token files (shards), in file order; incomplete ones dropped (with a warning)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records = list(merge_files(paths).values())
    if complete_only:
        done = [r for r in records if is_complete(r)]
        if len(done) < len(records):
            warnings.warn(f"{', '.join(map(str, paths))}: skipping {len(records) - len(done)} incomplete records "
                          "(extraction unfinished? rerun it to resume)", stacklevel=2)
        records = done
    return records


def clip_of(record: Mapping[str, Any]) -> str:
    """The clip a record belongs to (questions of one clip share it)."""
    return str(record.get("clip_id") or record["id"])


def split_by_clip(records: Sequence[Mapping[str, Any]], fraction: float = 0.1,
                  salt: str = "token_alignment_val") -> tuple[list[dict], list[dict]]:
    """(train, val): a fixed share of CLIPS (not questions) goes to val, picked by a stable hash of the clip id.

    Deterministic and independent of record order and of any other file; at least one clip goes
    to each side when there are two or more clips.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    clips = sorted({clip_of(r) for r in records}, key=lambda c: (zlib.crc32(f"{salt}:{c}".encode()), c))
    if len(clips) < 2:
        raise ValueError(f"need at least 2 clips to hold some out for validation, got {len(clips)}; "
                         "extract more training clips or pass --val_tokens")
    n_val = min(max(1, round(fraction * len(clips))), len(clips) - 1)
    val_clips = set(clips[:n_val])
    train = [dict(r) for r in records if clip_of(r) not in val_clips]
    val = [dict(r) for r in records if clip_of(r) in val_clips]
    return train, val


def file_lock(path: str | Path, poll_seconds: float = 5.0, log=print):
    """Hold the exclusive lock ``path`` + '.lock' (waits, saying who holds it, while another run does):
    :func:`common.results.file_lock`, the toolkit's one lock."""
    return common_file_lock(Path(str(path) + ".lock"), wait=True, poll_seconds=poll_seconds, log=log,
                            what=str(path))
