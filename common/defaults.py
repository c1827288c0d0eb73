"""The embedded default every script falls back to: the shipped model pair and a small synthetic split.

- Models: ``models/eventgpt`` and ``models/videollava`` in the repository (the trained tiny pair,
  see models/README.md). If they are absent, a random-weight tiny pair is written once to
  ``.cache/tiny_models`` (with a warning: its acceptance numbers are noise).
- Data: ``data/synthetic_default`` (a small synthetic test split), generated on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
RANDOM_MODELS_DIR = REPO_ROOT / ".cache" / "tiny_models"
DEFAULT_DATASET_DIR = REPO_ROOT / "data" / "synthetic_default"
# The split the default dataset holds and how it is made (same world settings as the shipped pair's training).
DEFAULT_DATASET = {"num_clips": 12, "duration": "1s", "split": "test", "seed": 1000, "width": 320, "height": 240}

# A small train split in the same folder (different seed, same frame size), for the demo's alignment runs.
DEFAULT_TRAIN = {**DEFAULT_DATASET, "num_clips": 24, "split": "train", "seed": 2000}

log = logging.getLogger(__name__)


def default_model_path(kind: str) -> Path:
    """The shipped pair's ``kind`` folder, else a random tiny checkpoint made once."""
    shipped = MODELS_DIR / kind
    if (shipped / "config.json").is_file():
        return shipped
    random_dir = RANDOM_MODELS_DIR / kind
    if not (random_dir / "config.json").is_file():
        from common.models.tiny import make_tiny_models  # heavy (transformers): only on first use

        log.warning("no shipped model pair under %s: writing random tiny models to %s", MODELS_DIR, RANDOM_MODELS_DIR)
        make_tiny_models(RANDOM_MODELS_DIR)
    return random_dir


def default_dataset_dir() -> Path:
    """The default synthetic test split, generated on first use."""
    index = DEFAULT_DATASET_DIR / "EventGPT_Instruction_Subset.json"
    if not index.is_file():
        from common.synthetic_dataset import write_synthetic_dataset  # heavy (video, PIL): only on first use

        log.warning("generating the default synthetic dataset in %s (first use)", DEFAULT_DATASET_DIR)
        write_synthetic_dataset(DEFAULT_DATASET_DIR, **DEFAULT_DATASET)
    return DEFAULT_DATASET_DIR


DEFAULT_SPLIT = "test"


def resolve_split(dataset_dir: str | None, split: str | None) -> str | None:
    """``--split`` if given; on the embedded default dataset (no ``--dataset_dir``) its test split, so the
    train clips the demo adds beside it are never benchmarked; else None (every split of the dataset)."""
    if split:
        return split
    return DEFAULT_SPLIT if dataset_dir is None else None


def default_train_split() -> Path:
    """The default folder with its small synthetic train split added (generated on first use)."""
    folder = default_dataset_dir()
    index = folder / "EventGPT_Instruction_Subset.json"
    if '"split": "train"' not in index.read_text():
        from common.synthetic_dataset import write_synthetic_dataset

        log.warning("adding a small synthetic train split to %s (first use)", folder)
        write_synthetic_dataset(folder, **DEFAULT_TRAIN)
    return folder


def resolve_model_paths(eventgpt_path: str | None, videollava_path: str | None) -> tuple[Path, Path]:
    """Flags if given, else the default pair."""
    return (Path(eventgpt_path) if eventgpt_path else default_model_path("eventgpt"),
            Path(videollava_path) if videollava_path else default_model_path("videollava"))


def resolve_dataset_dir(dataset_dir: str | None) -> Path:
    """The flag if given, else the default synthetic split."""
    return Path(dataset_dir) if dataset_dir else default_dataset_dir()
