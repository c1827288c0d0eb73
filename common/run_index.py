"""``results/INDEX.md``: one line per run folder across every stage, rewritten after each run.

    from common.run_index import update_index
    update_index("results")          # after a run finished (RunFolder.mark_done, stage CLIs, demo)

A run folder is any folder under the results root holding ``config.json``, ``results.json`` or
``DONE`` (its sub-folders are not searched further). Each line gives the stage (the folder's
path under the root), the task, the date (from the ``_<YYYYMMDD_HHMMSS>`` suffix, else the
folder's modification time), whether it finished, n, the key figures found in
``results.json`` and a link to its RESULTS.md (else the folder).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_FILE = "INDEX.md"
_MARKERS = ("config.json", "results.json", "DONE")
_STAMP_RE = re.compile(r"^(?P<task>.+?)_(?P<stamp>\d{8}_\d{6})(?:_\d+)?$")
_MAX_DEPTH = 4

# (label, path into results.json["statistics"], format): the first few present are shown.
KEY_FIGURES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("speedup", ("speedup_measured",), "{:.2f}x"),
    ("SD speedup", ("sd_speedup_measured",), "{:.2f}x"),
    ("acceptance", ("acceptance_rate_avg",), "{:.3f}"),
    ("SD acceptance", ("sd_acceptance_rate_avg",), "{:.3f}"),
    ("mean acc. len", ("mean_accepted_length_avg",), "{:.2f}"),
    ("lossless", ("lossless_rate",), "{:.2f}"),
    ("SD lossless", ("sd_lossless_rate",), "{:.2f}"),
    ("TF top-1", ("test_teacher_forced", "adapter_top1"), "{:.3f}"),
    ("live acceptance", ("live", "adapter", "acceptance_rate"), "{:.3f}"),
    ("test cos", ("test", "cos"), "{:.3f}"),
    ("test top-1", ("test", "top1"), "{:.3f}"),
    ("val cos", ("best", "val_cos"), "{:.3f}"),
)
MAX_FIGURES = 4


@dataclass(frozen=True)
class RunEntry:
    """One line of the index."""

    stage: str
    task: str
    date: str
    status: str
    n: int | None
    figures: str
    link: str


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def key_figures(statistics: Mapping[str, Any]) -> str:
    """The first :data:`MAX_FIGURES` key figures present in ``statistics``, e.g. ``speedup 1.20x, lossless 1.00``."""
    out = []
    for label, path, fmt in KEY_FIGURES:
        value = _dig(statistics, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(f"{label} {fmt.format(value)}")
        if len(out) == MAX_FIGURES:
            break
    return ", ".join(out)


def _count(results: Mapping[str, Any]) -> int | None:
    stats = results.get("statistics") or {}
    for path in (("num_samples",), ("test_teacher_forced", "num_samples"), ("n",), ("train_samples",)):
        value = _dig(stats, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    samples = results.get("samples")
    return len(samples) if isinstance(samples, list) else None


def find_runs(results_root: str | os.PathLike) -> list[Path]:
    """Every run folder under ``results_root`` (see the module docstring), sorted by path."""
    root = Path(results_root)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any((child / m).exists() for m in _MARKERS):
                found.append(child)
            else:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 1)
    return found


def _read_results(run: Path) -> dict:
    try:
        data = json.loads((run / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_run(run: Path, results_root: str | os.PathLike) -> RunEntry:
    """The index line of one run folder."""
    root = Path(results_root)
    rel = run.relative_to(root)
    m = _STAMP_RE.match(run.name)
    if m:
        task = m.group("task")
        date = _dt.datetime.strptime(m.group("stamp"), "%Y%m%d_%H%M%S").strftime("%Y-%m-%d %H:%M")
    else:
        task = run.name
        date = _dt.datetime.fromtimestamp(run.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    results = _read_results(run)
    has_results = bool(results)
    status = "done" if (run / "DONE").exists() else ("finished" if has_results else "unfinished")
    target = run / "RESULTS.md" if (run / "RESULTS.md").is_file() else run
    return RunEntry(stage=str(rel.parent.as_posix()) if str(rel.parent) != "." else "-", task=task, date=date,
                    status=status, n=_count(results) if has_results else None,
                    figures=key_figures(results.get("statistics") or {}),
                    link=target.relative_to(root).as_posix())


def render_index(entries: list[RunEntry]) -> str:
    """INDEX.md text: newest first, one table row per run."""
    lines = ["# Runs", "",
             "One line per run folder under this directory (rewritten after each run; newest first). "
             "`done`: the run finished; `unfinished`: still running, killed or failed (rerun the same "
             "command to continue it). n = samples in its results.json.", "",
             "| date | stage | task | status | n | key figures | link |", "|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e.date, e.stage, e.task), reverse=True):
        n = "-" if e.n is None else str(e.n)
        lines.append(f"| {e.date} | {e.stage} | {e.task} | {e.status} | {n} | {e.figures or '-'} | "
                     f"[{e.link}]({e.link}) |")
    return "\n".join(lines) + "\n"


def update_index(results_root: str | os.PathLike = "results") -> Path | None:
    """Rewrite ``<results_root>/INDEX.md`` from the run folders there; returns its path (None: no root).

    Never raises on a broken run folder: the index is a convenience, a run must not fail for it.
    """
    from common.results import atomic_write_text

    root = Path(results_root)
    if not root.is_dir():
        return None
    entries = []
    for run in find_runs(root):
        try:
            entries.append(describe_run(run, root))
        except (OSError, ValueError):
            continue
    return atomic_write_text(root / INDEX_FILE, render_index(entries))


def results_root_of(path: str | os.PathLike, fallback: str | os.PathLike | None = None) -> Path:
    """The results root of a run folder (or other output): the nearest of ``path`` and its ancestors named
    ``results``; else ``fallback``, else the grandparent (``<base>/<stage>/<run>`` -> ``<base>``)."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.name == "results":
            return folder
    return Path(fallback) if fallback is not None else path.parent.parent
