"""Session fixtures: tiny checkpoints in the real formats, written once per test session."""

from __future__ import annotations

import pytest
import torch

from scripts.make_tiny_models import make_tiny_models


def pytest_configure(config):
    """Tiny models on a small CPU: one intra-op thread is several times faster than oversubscribing."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """DIR with eventgpt/ and videollava/ tiny random-weight checkpoints (real on-disk formats)."""
    out = tmp_path_factory.mktemp("tiny_models")
    make_tiny_models(out, seed=0, vocab_size=600)
    return out


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
