"""scripts.train_drafters: every trainable drafter of a pair in one command, shaped as the widening expects."""

from __future__ import annotations

import json

import pytest

from common.data import INDEX_NAME
from common.defaults import MODELS_DIR
from common.drafters.widen import DrafterSources, widen_drafters
from scripts.train_drafters import drafter_flags, main


def test_drafter_flags_pass_every_checkpoint():
    paths = {"token_adapter": "t", "hidden_adapter": ["a/L1", "a/L5"], "eagle_head": "e"}
    assert drafter_flags(paths) == ["--token_adapter", "t", "--hidden_adapter", "a/L1,a/L5", "--eagle_head", "e"]


@pytest.mark.slow
def test_tiny_run_trains_every_drafter_and_they_widen(tmp_path):
    summary = main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--num_clips", "6",
                    "--num_test", "2", "--width", "64", "--height", "48", "--max_new_tokens", "6",
                    "--token_epochs", "1", "--hidden_epochs", "1", "--eagle_epochs", "1", "--batch_size", "6",
                    "--device", "cpu", "--num_workers", "1"])
    paths = summary["paths"]
    out = tmp_path / "out"
    assert paths == {"token_adapter": str(out / "token_adapter"), "eagle_head": str(out / "eagle_head"),
                     "hidden_adapter": [str(out / "L1.safetensors"), str(out / "L5.safetensors")]}
    assert (out / "eagle_head_RESULTS.md").is_file() and (out / "L5_RESULTS.md").is_file()
    assert json.loads((tmp_path / "out" / "drafters.json").read_text())["flags"] == summary["flags"]
    questions = [e["conversations"][0]["value"] for e in
                 json.loads((tmp_path / "data" / "train" / INDEX_NAME).read_text())]
    assert sum("key elements" in q for q in questions) >= 1 and len(set(questions)) == 6
    widened = widen_drafters(tmp_path / "twin", DrafterSources(paths["eagle_head"], tuple(paths["hidden_adapter"]),
                                                               paths["token_adapter"]),
                             MODELS_DIR / "eventgpt", MODELS_DIR / "videollava", "small")
    assert [e["level"] for e in widened["hidden_adapter"]] == [1, 5]
    assert widened["eagle_head"]["feature_layer"] == -1 and widened["hidden_adapter"][0]["input_layer"] == -1
    assert (tmp_path / "twin" / "drafters" / "token_adapter" / "model.safetensors").is_file()
