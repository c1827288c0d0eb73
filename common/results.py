"""Run folders, atomic JSON writing, per-sample records and small summaries.

One run = one folder ``results/<stage>/<task_name>_<YYYYMMDD_HHMMSS>/`` with
``config.json``, ``records.jsonl`` (per-sample records, appended as they finish, so a
killed run can resume), ``results.json``, ``RESULTS.md``, PNG plots and a ``DONE`` marker.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RECORDS_FILE = "records.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "RESULTS.md"
DONE_FILE = "DONE"
LOCK_FILE = "run.lock"
_TIMESTAMP_FMT = "%Y%m%d_%H%M%S"
_TIMESTAMP_RE = re.compile(r"_(\d{8}_\d{6})(?:_\d+)?$")


# --------------------------------------------------------------------------- JSON helpers


def to_jsonable(obj: Any, strict: bool = True) -> Any:
    """Convert ``obj`` into plain JSON types.

    NaN/inf -> None; numpy scalars/arrays, torch tensors -> numbers/lists; Paths, devices,
    dtypes -> str; sets/tuples -> lists. Anything else raises ``TypeError`` when ``strict``,
    else becomes ``str(obj)``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, strict) for v in obj]
    if isinstance(obj, argparse.Namespace):
        return to_jsonable(vars(obj), strict)
    # numpy / torch without importing them eagerly
    mod = type(obj).__module__.split(".")[0]
    if mod == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
    if mod == "torch":
        import torch

        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            return to_jsonable(t.tolist())
        if isinstance(obj, (torch.device, torch.dtype)):
            return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if not strict:
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Serialise ``obj`` to strict JSON text (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; 0o022 is the safe value meanwhile
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, which is
    fsynced, given the usual permissions and renamed over ``path``; on any error the temp file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON Lines file. A truncated or corrupt last line (a killed run; with or without
    its newline) is skipped with a warning; a corrupt line elsewhere raises an error naming the file
    and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        elif i == last:
            warnings.warn(f"{path}: ignoring a truncated or corrupt last line (a killed run?)", stacklevel=2)
        else:
            raise ValueError(f"corrupt JSON in {path} at line {i + 1}; delete that line or the file")
    return out


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically. Serialisation happens before any file is touched."""
    text = dumps_json(obj) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | Path) -> Any:
    """Read a JSON file; corrupt JSON raises ``ValueError`` with a one-line message naming the file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None


# --------------------------------------------------------------------------- environment


def _git_info() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repo holding this file; (None, None) if not a git repo."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip() or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy"):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            try:
                out[name] = str(importlib.import_module(name).__version__)
            except Exception:  # noqa: BLE001 - a broken optional package must not stop a run
                continue
    return out


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or "cpu"


def _last_line_start(f, size: int, block: int) -> int:
    """Offset where the last line of an open binary file begins (ignoring its final newline)."""
    pos = size - 1 if size else 0  # skip the final newline: it ends the last line, it does not start one
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _drop_partial_last_line(path: Path, block: int = 1 << 16) -> None:
    """Cut a last line that is not a JSON record (a killed run), with or without its newline.

    A complete record that only lacks its newline is kept and given one.
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        cut = _last_line_start(f, size, block)
        f.seek(cut)
        tail = f.read()
        try:
            ok = isinstance(json.loads(tail), dict) if tail.strip() else True
        except ValueError:
            ok = False
        if ok:
            if not tail.endswith(b"\n"):  # a complete record that only lacks its newline: keep it
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            return
        warnings.warn(f"{path}: dropping a truncated or corrupt last line ({size - cut} bytes) from a killed run",
                      stacklevel=3)
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line, then flush and fsync (a kill loses at most this line).

    A partial last line left by a killed run is cut off first (with a warning), so the file
    stays valid JSON Lines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = dumps_json(record, indent=None)
    if path.exists():
        _drop_partial_last_line(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- locking


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (other settings, another run holds it); one line."""


@contextmanager
def file_lock(lock_path: str | Path, *, wait: bool = True, poll_seconds: float = 5.0,
              log: Callable[[str], Any] = print, what: str | None = None, remove: bool = False,
              hint: str = "start a separate run with another --task_name") -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (the one lock of the toolkit).

    The OS releases it when the holder dies, so a killed run never leaves a stale lock; the
    file holds the holder's pid for humans. While another process holds it: ``wait`` polls
    (saying so once), else :class:`RunFolderError` is raised with one line naming ``what`` and
    ``hint``. ``remove`` deletes the file on release (only for ``wait=False`` users: a waiter
    could otherwise lock a deleted file).
    """
    lock_path = Path(lock_path)
    what = what or str(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if not wait:
                    raise RunFolderError(f"{what}: another run (pid {holder}) is writing it; wait for it to "
                                         f"finish, or {hint}") from None
                if not waited:
                    log(f"{what}: another run (pid {holder}) is writing it; waiting for it to finish")
                    waited = True
                time.sleep(poll_seconds)
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if held:
            try:
                os.ftruncate(fd, 0)
                if remove:
                    lock_path.unlink(missing_ok=True)
            except OSError:
                pass
        os.close(fd)  # closing releases the flock


def lock_held(lock_path: str | Path) -> bool:
    """Whether a live process holds the :func:`file_lock` on ``lock_path`` (a leftover file is not held)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def settings_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two settings dicts (compared as JSON), sorted."""
    a, b = to_jsonable(dict(stored), strict=False), to_jsonable(dict(wanted), strict=False)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# --------------------------------------------------------------------------- run folder


class RunFolder:
    """One run's output folder; see the module docstring for its layout."""

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunFolder({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The run folder."""
        return self._path

    @classmethod
    def create(
        cls,
        stage: str,
        task_name: str,
        output_dir: str | Path | None = None,
        resume: bool = True,
        settings: Mapping[str, Any] | None = None,
        include_done: bool = False,
    ) -> RunFolder:
        """Make ``<output_dir or results/<stage>>/<task_name>_<YYYYMMDD_HHMMSS>/``.

        With ``resume`` and an unfinished folder (no ``DONE``; any with ``include_done``) of the
        same ``task_name`` under the base, reuse the newest such folder instead. With ``settings``
        (what shapes the results) that folder is checked first (see :meth:`adopt`): records made
        with other settings raise :class:`RunFolderError`; a folder without records whose
        settings differ (a failed start) is left alone and a new folder is made.
        """
        if not task_name or "/" in task_name or "\\" in task_name:
            raise ValueError(f"task_name must be a non-empty name without slashes, got {task_name!r}")
        base = Path(output_dir) if output_dir is not None else Path("results") / stage
        if resume:
            found = cls.find_unfinished(base, task_name, include_done=include_done)
            if found is not None and (settings is None or cls(found).adopt(settings)):
                return cls(found)
        stamp = _dt.datetime.now().strftime(_TIMESTAMP_FMT)
        path = base / f"{task_name}_{stamp}"
        n = 1
        while path.exists():  # two runs started within the same second
            path = base / f"{task_name}_{stamp}_{n}"
            n += 1
        return cls(path)

    def adopt(self, settings: Mapping[str, Any]) -> bool:
        """Whether a run with ``settings`` may continue in this folder.

        No records yet (a failed start): True when the stored settings match or none are
        stored, False otherwise (start a new folder). Records present: True when the stored
        settings match; else :class:`RunFolderError` names the keys that differ.
        """
        stored = self.stored_settings()
        if not self.load_records():
            return stored is None or not settings_diff(stored, settings)
        if stored is None:
            raise RunFolderError(f"{self._path}: holds records but config.json records no settings to check them "
                                 "against; start fresh with another --task_name or --no_resume")
        diff = settings_diff(stored, settings)
        if diff:
            old, new = to_jsonable(stored, strict=False), to_jsonable(dict(settings), strict=False)
            shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise RunFolderError(f"{self._path}: resume refused, its records were made with other settings "
                                 f"({shown}); rerun with the same flags, or start fresh with another "
                                 "--task_name or --no_resume")
        return True

    def stored_settings(self) -> dict[str, Any] | None:
        """The ``settings`` recorded in ``config.json`` (None when absent or unreadable)."""
        path = self._path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            config = read_json(path)
        except (OSError, ValueError):
            return None
        found = config.get("settings") if isinstance(config, dict) else None
        return found if isinstance(found, dict) else None

    @contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold this folder's lock for a run; a second run at once raises :class:`RunFolderError`."""
        with file_lock(self._path / LOCK_FILE, wait=False, what=str(self._path)):
            yield self

    @staticmethod
    def find_unfinished(base: str | Path, task_name: str, include_done: bool = False) -> Path | None:
        """Newest folder ``<task_name>_<timestamp>`` under ``base`` without a ``DONE`` marker
        (or with one too, given ``include_done``)."""
        base = Path(base)
        if not base.is_dir():
            return None
        candidates = []
        for p in base.iterdir():
            if not p.is_dir() or not p.name.startswith(task_name + "_"):
                continue
            rest = p.name[len(task_name):]
            m = _TIMESTAMP_RE.fullmatch(rest)
            if m is None or ((p / DONE_FILE).exists() and not include_done):
                continue
            suffix = rest[len(m.group(1)) + 1:]
            candidates.append((m.group(1), int(suffix[1:]) if suffix else 0, p))
        if not candidates:
            return None
        return max(candidates)[2]

    # -- config ------------------------------------------------------------------------

    def write_config(
        self, args: argparse.Namespace | Mapping[str, Any] | None, argv: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``config.json``: args, argv, git commit/dirty, package versions, device, host, start time,
        and the ``settings`` that shape the results (checked on resume)."""
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        commit, dirty = _git_info()
        config = {
            "args": to_jsonable(dict(args or {}), strict=False),
            "argv": list(argv) if argv is not None else None,
            "git_commit": commit,
            "git_dirty": dirty,
            "versions": _versions(),
            "device_name": _device_name(),
            "hostname": socket.gethostname(),
            "start_time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        if settings is not None:
            config["settings"] = to_jsonable(dict(settings), strict=False)
        return atomic_write_json(self._path / CONFIG_FILE, config)

    # -- records -----------------------------------------------------------------------

    @property
    def records_path(self) -> Path:
        return self._path / RECORDS_FILE

    def load_records(self) -> list[dict]:
        """Records in ``records.jsonl``; a truncated/corrupt last line is skipped with a warning."""
        return read_jsonl(self.records_path)

    def append_record(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line, then flush and fsync.

        A partial last line left by a killed run is cut off first (with a warning), so the
        file stays valid JSON Lines.
        """
        append_jsonl(self.records_path, record)

    def drop_failed(self, keep: Callable[[Mapping[str, Any]], bool] = lambda r: False) -> int:
        """Remove failed records (those with ``error``) that ``keep`` rejects; the rest stay in order.

        Rewrites ``records.jsonl`` atomically without every failed record that ``keep`` rejects;
        returns how many were removed (``--retry_failed``: those samples run again).
        """
        records = self.load_records()
        kept = [r for r in records if "error" not in r or keep(r)]
        if len(kept) != len(records):
            text = "".join(dumps_json(r, indent=None) + "\n" for r in kept)
            atomic_write_text(self.records_path, text)
        return len(records) - len(kept)

    def finished_ids(self) -> set[str]:
        """The ``id`` of every stored record (as str), for skipping finished work on resume."""
        return {str(r["id"]) for r in self.load_records() if isinstance(r, dict) and "id" in r}

    # -- outputs -----------------------------------------------------------------------

    def write_results(
        self,
        records: Sequence[Mapping[str, Any]],
        statistics: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``results.json`` = {"samples": records, "statistics": statistics, **extra} atomically."""
        obj: dict[str, Any] = {"samples": list(records), "statistics": dict(statistics)}
        obj.update(extra or {})
        return atomic_write_json(self._path / RESULTS_FILE, obj)

    def write_markdown(self, text: str) -> Path:
        """Write ``RESULTS.md`` atomically."""
        return atomic_write_text(self._path / MARKDOWN_FILE, text if text.endswith("\n") else text + "\n")

    def clear_done(self) -> None:
        """Remove the ``DONE`` marker (a finished run being continued, e.g. to retry failed samples)."""
        (self._path / DONE_FILE).unlink(missing_ok=True)

    def mark_done(self) -> Path:
        """Write the ``DONE`` marker (a finished run is never resumed)."""
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return atomic_write_text(self._path / DONE_FILE, stamp + "\n")

    @property
    def done(self) -> bool:
        return (self._path / DONE_FILE).exists()


# --------------------------------------------------------------------------- summaries


def _clean(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """mean, std (population), median, min, max and count of ``values``, ignoring None/NaN/inf."""
    xs = sorted(_clean(values))
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "count": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
    mid = n // 2
    median = xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2
    return {"mean": mean, "std": std, "median": median, "min": xs[0], "max": xs[-1], "count": n}


def stage_means(records: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, float | None]:
    """Mean of each key over the records that have it (None/NaN ignored; None if no values)."""
    records = list(records)
    return {k: summarize(r.get(k) for r in records)["mean"] for k in keys}


def _fmt_cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, floatfmt) if math.isfinite(v) else str(v)
    mod = type(v).__module__.split(".")[0]
    if mod == "numpy" and hasattr(v, "item"):
        return _fmt_cell(v.item(), floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f"
) -> str:
    """A GitHub-flavoured Markdown table; columns default to the keys in first-seen order."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    columns = list(columns)
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(_fmt_cell(c, floatfmt) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt_cell(r.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"
