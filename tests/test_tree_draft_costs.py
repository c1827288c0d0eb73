"""The draft-tree cost CLI (benchmark_parallel_prefill.tree_draft_costs) on a tiny head on the CPU."""

from __future__ import annotations

import json

import pytest

from benchmark_parallel_prefill.tree_draft_costs import main


def test_tree_draft_costs_on_the_cpu(tmp_path):
    out = main(["--tiny", "--device", "cpu", "--steps", "1", "--context", "6", "--sharpness", "1,16",
                "--decode_ms", "2.5", "--tree_topk", "4", "--tree_tokens", "16", "--output_dir", str(tmp_path)])
    flat, sharp = out["rows"]
    assert out["mode"] == "static" and (out["tree_topk"], out["tree_tokens"]) == (4, 16)
    for row in (flat, sharp):
        assert row["nodes"] == 15 and row["expansions"] >= row["depth"] - 1 >= 1
        assert row["c"] == pytest.approx(row["ms"] / 2.5) and row["c_eager"] == pytest.approx(row["eager_ms"] / 2.5)
        assert row["ms"] > row["root_ms"] > 0
    assert sharp["depth"] > flat["depth"]  # a confident head grows deeper trees
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["depth"] == sharp["depth"]
    assert "topk 4, 16 rows per tree" in (tmp_path / "RESULTS.md").read_text()


def test_tree_draft_costs_honours_a_depth_cap(tmp_path):
    out = main(["--tiny", "--device", "cpu", "--steps", "1", "--context", "6", "--sharpness", "16",
                "--decode_ms", "2.5", "--tree_topk", "4", "--tree_tokens", "16", "--tree_depth", "2",
                "--output_dir", str(tmp_path)])
    (row,) = out["rows"]
    assert out["tree_depth"] == 2 and row["depth"] == 2 and row["expansions"] == 1  # uncapped, it grows deeper


def test_tree_draft_costs_rejects_bad_sharpness(tmp_path):
    with pytest.raises(ValueError, match="--sharpness"):
        main(["--tiny", "--device", "cpu", "--sharpness", "0,x", "--output_dir", str(tmp_path)])
