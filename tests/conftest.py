"""Session fixtures: tiny checkpoints in the real formats, written once per test session."""

from __future__ import annotations

import pytest
import torch

from scripts.make_tiny_models import make_tiny_models
from tests.data_fixtures import make_dataset


def pytest_configure(config):
    """Tiny models on a small CPU: one intra-op thread is several times faster than oversubscribing."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """DIR with eventgpt/ and videollava/ tiny random-weight checkpoints (real on-disk formats)."""
    out = tmp_path_factory.mktemp("tiny_models")
    make_tiny_models(out, seed=0, vocab_size=600)
    return out


@pytest.fixture(scope="module")
def models():
    """(EventGPT, Video-LLaVA): the default tiny pair on the CPU (random weights until a trained pair
    ships), loaded once per test module."""
    from common.defaults import default_model_path
    from common.models.loader import load_vlm

    return (load_vlm("eventgpt", default_model_path("eventgpt"), device="cpu"),
            load_vlm("videollava", default_model_path("videollava"), device="cpu"))


@pytest.fixture(scope="module")
def fa_dataset(tmp_path_factory):
    """A 4-clip, 160x120 synthetic train split (the feature-alignment tests' data), built once per test module."""
    out = tmp_path_factory.mktemp("fa_dataset")
    make_dataset(out, num_clips=4, split="train", seed=5, width=160, height=120)
    return out


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
