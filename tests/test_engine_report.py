"""The engine report (real_shape_benchmark --engine) on the tiny pair on the CPU: its numbers hang together."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark_inference.engine_report import EngineOptions, engine_report
from common.models.loader import load_vlm


def test_engine_report_on_the_cpu(tiny_models_dir, tmp_path):
    draft = load_vlm("eventgpt", tiny_models_dir / "eventgpt", quant="fp32", device="cpu")
    target = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cpu")
    opts = EngineOptions(modes=["eager", "cuda_graph"], new_tokens=4, gamma=3, steps=2, context=4,
                         concurrent_repeats=1, baselines=False)
    written = []
    report = engine_report(draft, target, opts, write=lambda r: written.append(json.loads(json.dumps(r))))
    assert report["card"] == "cpu" and report["torch"] == torch.__version__
    assert report["ours"]["cuda_graph"]["failed"].startswith("ValueError")  # no graphs on the CPU
    assert report["decode_mode"] == "eager"
    assert report["decode_ms_per_token"] == report["ours"]["eager"]["decode_ms_per_token"] > 0
    assert report["verify_over_decode"] == report["ours"]["eager"]["verify_over_decode"] > 0
    assert report["tree_verify_over_decode"] == report["ours"]["eager"]["tree_verify_over_decode"] > 0
    eager = report["ours"]["eager"]  # the EAGLE route's whole tree verify step, and how its forwards ran
    assert report["eagle_tree_verify_over_decode"] == pytest.approx(eager["eagle_tree_verify_ms"] / eager["eagle_forward_ms"])
    assert report["eagle_tree_routes"] == {"eager": 3, "eager_tree:no_graphs": 3}  # warm-up + 2 steps each, no graphs
    c = (report["eagle_step_ms"] + report["eagle_commit_ms"] / 3) / report["decode_ms_per_token"]
    assert report["eagle_c"] == pytest.approx(c) and c > 0
    assert report["eagle_chain_mode"] == "static"  # the graphs' fixed-shape chain, run eagerly on the CPU
    assert report["eagle_step_ms"] == pytest.approx(report["eagle_chain_chain_ms"] / 3)
    assert report["eagle_commit_ms"] == report["eagle_chain_commit_ms"] > 0
    assert report["eagle_chain_proposal_ms"] > 0 and "eagle_chain_failed" not in report
    c_eager = (report["eagle_eager_step_ms"] + report["eagle_eager_commit_ms"] / 3) / report["decode_ms_per_token"]
    assert report["eagle_c_eager"] == pytest.approx(c_eager) and c_eager > 0
    tree_c = report["eagle_tree_ms"] / report["decode_ms_per_token"]  # one topk-4, 16-row tree per verify
    assert report["eagle_tree_c"] == pytest.approx(tree_c) and tree_c > 0 and "eagle_tree_failed" not in report
    assert report["eagle_tree_c_eager"] == pytest.approx(report["eagle_tree_eager_ms"] / report["decode_ms_per_token"])
    assert report["eagle_tree_nodes"] == 15 and report["eagle_tree_expansions"] >= report["eagle_tree_depth"] - 1 >= 1
    l5 = report["l5_chain_proposal_ms"] / 3 / report["decode_ms_per_token"]
    assert report["l5_chain_c"] == pytest.approx(l5) and l5 > 0 and "l5_chain_failed" not in report
    assert report["prompt_tokens"] > 8 * 17  # 8 frames x (16 patches + CLS) at the tiny shapes
    assert report["prefill_ms"] > 0 and report["vision_encode_ms"] > 0
    assert 0 < report["prefill_llm_ms"] and "prefill_eager_ms" not in report  # Triton prefill: CUDA only
    slowdown = report["target_prefill_concurrent_ms"] / report["target_prefill_alone_ms"]
    assert report["concurrent_prefill_slowdown"] == pytest.approx(slowdown)
    assert report["free_draft_tokens"] >= 0 and report["free_draft_tokens"] == int(report["free_draft_tokens"])
    best = report["concurrency_variants"][report["concurrency_variant"]]  # the best in-process way, named
    assert report["free_draft_tokens"] == best["free_draft_tokens"]
    assert report["concurrent_prefill_slowdown"] == best["concurrent_prefill_slowdown"]
    assert set(report["concurrency_variants"]) == {"a0_threads", "a_threads_priority", "b_draft_graphs",
                                                   "b_draft_graphs_switch"}  # no green contexts on the CPU
    assert "baselines" not in report
    assert len(written) == 3 and written[-1]["free_draft_tokens"] == report["free_draft_tokens"]


def test_quant4_report_on_the_cpu(tiny_models_dir):
    """The 4-bit target's decode and verify figures (bitsandbytes alone: no Triton nf4 kernel on the CPU)."""
    pytest.importorskip("bitsandbytes")
    from benchmark_inference.engine_report import quant4_report

    target = load_vlm("videollava", tiny_models_dir / "videollava", quant="4bit", device="cpu")
    opts = EngineOptions(modes=["eager"], new_tokens=3, gamma=3, steps=2)
    out = quant4_report(target, opts)
    row = out["ours_4bit_bnb"]["eager"]
    assert out["decode_mode_4bit"] == "eager" and "ours_4bit_nf4_kernel" not in out
    assert out["decode_ms_per_token_4bit"] == row["decode_ms_per_token"] > 0
    assert out["verify_over_decode_4bit"] == row["verify_over_decode"] > 0
    assert out["prefill_ms_4bit"] > 0
