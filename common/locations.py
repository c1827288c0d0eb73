"""Where runs and extracted datasets go by default, and how old default places are still found.

Every stage writes its runs under ``results/<stage>/<task_name>_<YYYYMMDD_HHMMSS>/``; extracted
datasets (token pairs, hidden states) go under ``data/<stage>/``. Older versions wrote into the
source folders (``token_alignment/task``, ``feature_alignment/hidden``, ``feature_alignment/tasks``):
:func:`find_with_legacy` still finds what is there, with one deprecation line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.defaults import REPO_ROOT

RESULTS_DIR = Path("results")
DATA_DIR = Path("data")

log = logging.getLogger(__name__)
_warned: set[str] = set()


def results_dir(stage: str) -> Path:
    """``results/<stage>`` (relative to the current directory, as run folders are)."""
    return RESULTS_DIR / stage


def data_dir(stage: str) -> Path:
    """``data/<stage>``: extracted datasets of a stage (relative to the current directory)."""
    return DATA_DIR / stage


def _existing(path: Path) -> Path | None:
    """``path`` if it exists here, else the same relative path under the repository, else None."""
    if path.exists():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return None


def find_with_legacy(new: str | os.PathLike, legacy: str | os.PathLike, what: str) -> Path:
    """``new`` when it exists (or neither does); else ``legacy`` when only it exists, saying so once.

    ``what`` names the thing for the deprecation line, e.g. "hidden states of the train split".
    """
    new, legacy = Path(new), Path(legacy)
    found = _existing(new)
    if found is not None:
        return found
    old = _existing(legacy)
    if old is None:
        return new
    if str(old) not in _warned:
        _warned.add(str(old))
        log.warning("deprecated location: reading %s from %s; new runs write %s (move it there)", what, old, new)
    return old
