"""One spelling per drafter flag; the old spellings still parse and print one deprecation line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmark_parallel_prefill.compare_drafters import parse_named_paths
from common.drafters import factory
from common.drafters.factory import (
    DrafterChoice,
    DrafterFactory,
    add_drafter_args,
    drafter_choice,
    record_drafter,
)
from common.drafters.token_adapter import TokenAdapter, TokenAdapterConfig


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eventgpt_path")
    parser.add_argument("--videollava_path")
    add_drafter_args(parser)
    return parser.parse_args(list(argv))


def _deprecations(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("deprecated:")]


def test_new_spellings_choose_the_drafter_quietly(capsys) -> None:
    assert drafter_choice(_parse("--drafter", "token_adapter", "--token_adapter", "ckpt")) == \
        DrafterChoice(kind="token_adapter", token_adapter="ckpt")
    assert drafter_choice(_parse("--hidden_adapter", "L1.safetensors")).kind == "hidden_adapter"
    assert drafter_choice(_parse("--eagle_head", "head")).kind == "eagle"
    assert drafter_choice(_parse()).kind == "eventgpt"
    assert _deprecations(capsys.readouterr().err) == []


def test_old_spellings_still_work_with_one_line_each(capsys) -> None:
    args = _parse("--use_token_adapter", "--token_adapter_path", "ckpt")
    assert drafter_choice(args) == DrafterChoice(kind="token_adapter", token_adapter="ckpt")
    lines = _deprecations(capsys.readouterr().err)
    assert len(lines) == 2
    assert "--use_token_adapter" in lines[0] and "--drafter token_adapter" in lines[0]
    assert "--token_adapter_path" in lines[1] and "--token_adapter PATH" in lines[1]


def test_compare_drafters_hidden_adapter_takes_paths_and_the_old_pairs(capsys) -> None:
    assert parse_named_paths("a.safetensors, b.safetensors") == [(None, "a.safetensors"), (None, "b.safetensors")]
    assert _deprecations(capsys.readouterr().err) == []
    assert parse_named_paths("L1=a,L5=b") == [("L1", "a"), ("L5", "b")]
    assert len(_deprecations(capsys.readouterr().err)) == 1


def test_the_latest_token_adapter_picked_is_recorded(tmp_path: Path, monkeypatch) -> None:
    """``--drafter token_adapter`` without a path picks the latest checkpoint; config.json names it."""
    ckpt = tmp_path / "run" / "checkpoint"
    TokenAdapter(TokenAdapterConfig(draft_vocab_size=40, target_vocab_size=48, vocab_limit=32, d_model=16,
                                    n_layers=1, n_heads=2)).save_pretrained(ckpt)
    monkeypatch.setattr(factory, "find_latest_adapter", lambda **_: ckpt)
    made = factory.build_drafter_factory(DrafterChoice(kind="token_adapter"))
    assert made.kind == "token_adapter" and made.checkpoint == str(ckpt)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"args": {"drafter": "token_adapter", "token_adapter_path": None}}))
    record_drafter(config, made)
    written = json.loads(config.read_text())
    assert written["drafter"] == {"kind": "token_adapter", "checkpoint": str(ckpt)}
    assert written["args"]["drafter"] == "token_adapter"  # the rest is kept


def test_a_missing_checkpoint_flag_is_one_line() -> None:
    with pytest.raises(SystemExit, match="--hidden_adapter PATH"):
        factory.build_drafter_factory(DrafterChoice(kind="hidden_adapter"))
    assert DrafterFactory("eventgpt").checkpoint is None
