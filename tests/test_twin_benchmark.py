"""The twin benchmark: its formula, its data, and the whole command on a CPU-sized twin."""

from __future__ import annotations

import json

import pytest

from benchmark_parallel_prefill import twin_benchmark as tb
from common.results import read_jsonl
from common.speculative import predicted_speedup


def test_leviathan_with_verify_is_leviathan_at_unit_verify_cost():
    for a, c in ((0.5, 0.9), (0.8, 0.1), (0.95, 0.25)):
        assert tb.leviathan_with_verify(a, 5, c, 1.0) == pytest.approx(predicted_speedup(a, 5, c))
    # a verify step costing twice a decode step: (1 - 0.8^6) / (0.2 * (5 * 0.1 + 2))
    assert tb.leviathan_with_verify(0.8, 5, 0.1, 2.0) == pytest.approx((1 - 0.8 ** 6) / (0.2 * 2.5))


def test_twin_complete_needs_summary_configs_and_weights(tmp_path):
    assert not tb.twin_complete(tmp_path)
    (tmp_path / "widen_pair.json").write_text("{}")
    for kind in ("eventgpt", "videollava"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text("{}")
    assert not tb.twin_complete(tmp_path)  # no weights yet
    for kind in ("eventgpt", "videollava"):
        (tmp_path / kind / "model.safetensors").write_bytes(b"x")
    assert tb.twin_complete(tmp_path)


def test_a_stale_twin_is_told_apart_from_a_reusable_one(tmp_path):
    from common.defaults import MODELS_DIR
    from common.models.widen import source_fingerprint

    sources = {k: MODELS_DIR / k for k in ("eventgpt", "videollava")}
    summary = {"shape": "small", **{k: {"source": str(p), "source_fingerprint": source_fingerprint(p)}
                                    for k, p in sources.items()}}
    assert tb.stale_reason(summary, "small", sources) is None
    assert "shape small, not 7b" in tb.stale_reason(summary, "7b", sources)
    other = {**sources, "eventgpt": tmp_path}
    assert f"not {tmp_path}" in tb.stale_reason(summary, "small", other)
    summary["videollava"]["source_fingerprint"] = "0" * 64  # retrained in the same folder
    assert "changed since the twin was widened" in tb.stale_reason(summary, "small", sources)
    del summary["videollava"]["source_fingerprint"]  # a twin from before fingerprints: paths decide
    assert tb.stale_reason(summary, "small", sources) is None


def test_drafter_flags_of_the_widened_drafters():
    cfg = tb.TwinConfig(tree_topk=4, tree_tokens=12)
    assert tb.drafter_args(None, cfg) == ["--drafters", "eventgpt,pooled_x2", "--token_adapter", "none"]
    widened = {"hidden_adapter": [{"path": "d/L1.safetensors"}, {"path": "d/L5.safetensors"}],
               "eagle_head": {"path": "d/eagle_head"}}
    assert tb.drafter_args(widened, cfg) == ["--token_adapter", "none", "--hidden_adapter",
                                             "d/L1.safetensors,d/L5.safetensors", "--eagle_head", "d/eagle_head",
                                             "--tree_topk", "4", "--tree_tokens", "12"]
    capped = tb.drafter_args(widened, tb.TwinConfig(tree_topk=4, tree_tokens=12, tree_depth=5))
    assert capped[-2:] == ["--tree_depth", "5"]
    args = tb.drafter_args(widened, tb.TwinConfig(only="eventgpt,eagle"))
    assert args[args.index("--drafters") + 1] == "eventgpt,eagle" and "--eagle_head" in args


def test_test_sets_ask_long_and_short_questions_in_turn(tmp_path):
    from common.data import ClipDataset
    from common.synthetic import LONG_QUESTIONS

    sets = tb.make_twin_data(tmp_path, num_short=2, num_long=4, num_workers=1)
    long_qs = [s.question for s in ClipDataset(sets["long"])]
    assert long_qs == [*LONG_QUESTIONS, LONG_QUESTIONS[0]]
    short_qs = [s.question for s in ClipDataset(sets["short"])]
    assert len(short_qs) == 2 and not set(short_qs) & set(LONG_QUESTIONS)
    from common.data import INDEX_NAME

    entries = json.loads((sets["long"] / INDEX_NAME).read_text())
    styles = {json.loads((sets["long"] / e["ground_truth"]).read_text()).get("answer_style") for e in entries}
    assert styles == {"long"}
    made = (sets["long"] / INDEX_NAME).stat().st_mtime_ns
    again = tb.make_twin_data(tmp_path, num_short=2, num_long=4, num_workers=1)  # the same sets: reused
    assert again == sets and (sets["long"] / INDEX_NAME).stat().st_mtime_ns == made
    more = tb.make_twin_data(tmp_path, num_short=0, num_long=5, num_workers=1)  # another set: made afresh
    assert len(ClipDataset(more["long"])) == 5


ROWS = ("eventgpt", "pooled_x2", "token_adapter", "L1", "L5", "eagle", "hybrid")  # hybrid_L5 left out (CPU time)


@pytest.mark.slow
def test_whole_command_on_a_small_twin_is_lossless_and_consistent(tmp_path):
    from tests.drafter_fixtures import make_small_drafters

    d = make_small_drafters(tmp_path / "drafters")
    trained = {"paths": {"hidden_adapter": [str(d["L1"]), str(d["L5"])], "eagle_head": str(d["eagle"])}}
    (tmp_path / "drafters.json").write_text(json.dumps(trained))  # as scripts.train_drafters writes it
    out = tmp_path / "out"
    summary = tb.main(["--shape", "small", "--twin_dir", str(tmp_path / "twin"), "--data_dir", str(tmp_path / "data"),
                       "--output_dir", str(out), "--num_short", "1", "--num_long", "1", "--num_free", "1",
                       "--num_workers", "1", "--warmup_steps", "0", "--device", "cpu", "--max_new_tokens", "10",
                       "--drafters_json", str(tmp_path / "drafters.json"), "--token_adapter", str(d["token_adapter"]),
                       "--tree_topk", "2", "--tree_tokens", "6", "--drafters", ",".join(ROWS)])
    widened = summary["widened_drafters"]
    assert widened["eagle_head"]["hidden_size"] == 1024 and [e["level"] for e in widened["hidden_adapter"]] == [1, 5]
    assert widened["token_adapter"]["path"] == str(tmp_path / "twin" / "drafters" / "token_adapter")
    assert summary["twin"]["shape"] == "small" and not summary["twin"]["reused"]
    assert set(summary["sets"]) == {"long", "short"}
    for name, s in summary["sets"].items():
        recs = read_jsonl(summary["run_dirs"][name] + "/records.jsonl")
        target = next(r for r in recs if r["drafter"] == "target")
        hf = s["hf_records"][0]
        assert hf["token_ids"] == target["token_ids"]  # HF generate on the twin = our engine (fp32, CPU)
        assert s["hf"]["tokens_equal_engine_rate"] == 1.0
        assert s["target_answer_tokens_mean"] == len(target["token_ids"])
        assert set(s["drafters"]) - {"eventgpt_free_only"} == {*ROWS, "eagle_tree", "hybrid_tree"}
        for drafter in s["drafters"]:
            if drafter == "eventgpt_free_only":
                continue
            row = s["drafters"][drafter]
            assert row["lossless_rate"] == 1.0 and row["samples"] == 1
            rec = next(r for r in recs if r["drafter"] == drafter)
            assert row["speedup_vs_hf"] == pytest.approx(hf["wall_time"] / rec["wall_time"])
            assert row["speedup_measured"] == pytest.approx(target["wall_time"] / rec["wall_time"])
    assert summary["sets"]["long"]["drafters"]["eventgpt_free_only"]["lossless_rate"] == 1.0
    lines = (out / "TWIN_RESULTS.md").read_text().splitlines()
    assert sum(line.startswith("| eventgpt |") for line in lines) == 2  # one table row per set
    assert sum(line.startswith("| hybrid |") for line in lines) == 2
    assert (out / "timeline.png").stat().st_size > 0
    assert json.loads((out / "twin_results.json").read_text())["gamma"] == 5
    # a second run reuses the complete twin
    assert tb.ensure_twin(tmp_path / "twin", "small")["reused"] is True
