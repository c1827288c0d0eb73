"""Tests for common/cli.py: shared flags, device/quant resolution, seeding, sharding."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from common.cli import add_common_args, resolve_device, resolve_quant, set_seed, shard


def _parse(argv: list[str], **kw: bool) -> argparse.Namespace:
    return add_common_args(argparse.ArgumentParser(), **kw).parse_args(argv)


def test_defaults() -> None:
    a = _parse([])
    assert a.dataset_dir is None and a.max_samples is None
    assert a.eventgpt_path is None and a.videollava_path is None
    assert a.quant is None and a.device == "auto"
    assert a.output_dir is None and a.task_name is None
    assert a.seed == 0 and a.warmup_steps == 1
    assert a.max_questions == 1 and a.allow_pickle is False
    assert a.num_chunks == 1 and a.chunk_idx == 0
    assert a.resume is True


def test_flags_parse() -> None:
    a = _parse([
        "--dataset_dir", "d", "--max_samples", "5", "--quant", "4bit", "--device", "cpu",
        "--output_dir", "o", "--task_name", "t", "--seed", "3", "--warmup_steps", "0",
        "--split", "test", "--max_questions", "10", "--allow_pickle", "--num_chunks", "4",
        "--chunk_idx", "2", "--no_resume",
    ])
    assert a.max_samples == 5 and a.quant == "4bit" and a.max_questions == 10
    assert a.allow_pickle and a.num_chunks == 4 and a.chunk_idx == 2 and a.resume is False
    assert _parse(["--no_resume", "--resume"]).resume is True


def test_bad_choices_rejected() -> None:
    with pytest.raises(SystemExit):
        _parse(["--quant", "int3"])
    with pytest.raises(SystemExit):
        _parse(["--max_questions", "7"])


def test_groups_optional() -> None:
    p = add_common_args(argparse.ArgumentParser(), models=False, data=False, output=False)
    a = p.parse_args([])
    assert not hasattr(a, "quant") and not hasattr(a, "dataset_dir") and not hasattr(a, "output_dir")
    assert a.seed == 0


def test_every_flag_has_help() -> None:
    p = add_common_args(argparse.ArgumentParser())
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    assert "pickle" in p.format_help().lower()


def test_resolve_device_and_quant() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ns = argparse.Namespace(quant=None, device="cpu")
    assert resolve_quant(ns) == "fp32"
    assert resolve_quant(argparse.Namespace(quant="8bit", device="cpu")) == "8bit"


def test_set_seed_reproducible() -> None:
    set_seed(123)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(123)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 13, 100])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
def test_shard_covers_in_order(n: int, k: int) -> None:
    items = list(range(n))
    chunks = [shard(items, k, i) for i in range(k)]
    assert [x for c in chunks for x in c] == items
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_shard_validates() -> None:
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError):
        shard([1, 2], 2, -1)
    with pytest.raises(ValueError):
        shard([1, 2], 0, 0)
