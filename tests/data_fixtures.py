"""Shared fixtures/helpers for the data-layer tests (import them into a test module to use them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.events import EventStream


def make_stream(n: int = 1000, width: int = 64, height: int = 48, seed: int = 0) -> EventStream:
    """A random sorted event stream of ``n`` events on a width x height sensor."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 1_000_000, n)).astype(np.int64)
    return EventStream(
        x=rng.integers(0, width, n).astype(np.uint16), y=rng.integers(0, height, n).astype(np.uint16),
        t=t, p=rng.integers(0, 2, n).astype(np.uint8), width=width, height=height,
        time_start=0, time_end=1_000_000,
    )


def make_dataset(out: Path, num_clips: int = 3, split: str = "test", seed: int = 0, workers: int = 1,
                 extra: list[str] | None = None, width: int = 64, height: int = 48) -> dict:
    """Run the synthetic dataset maker in-process with tiny (default 64x48) clips."""
    from scripts.make_synthetic_dataset import main

    argv = ["--output_dir", str(out), "--num_clips", str(num_clips), "--split", split, "--seed", str(seed),
            "--width", str(width), "--height", str(height), "--num_workers", str(workers), *(extra or [])]
    return main(argv)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 4-clip, 64x48, 1 s synthetic test split (built once per session)."""
    out = tmp_path_factory.mktemp("tiny_dataset")
    make_dataset(out, num_clips=4, seed=7)
    return out
