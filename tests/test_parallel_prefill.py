"""benchmark_parallel_prefill on the tiny pair: concurrent prefill, measured free tokens, lossless."""

from __future__ import annotations

import time

import torch

from benchmark_parallel_prefill import benchmark_parallel_prefill as bp
from common.drafters import DrafterFactory
from common.models.loader import load_vlm
from common.parallel import run_parallel
from common.results import read_json
from common.speculative import autoregressive_generate
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)


def test_draft_decodes_free_tokens_while_the_target_prefills(tiny_models_dir, tiny_dataset):  # noqa: F811
    from common.data import ClipDataset

    draft = load_vlm("eventgpt", tiny_models_dir / "eventgpt", device="cpu")
    target = load_vlm("videollava", tiny_models_dir / "videollava", device="cpu")
    sample = ClipDataset(tiny_dataset)[0]
    slow_prefill = target.prefill

    def prefill(*args, **kwargs):  # a target whose prefill takes long, like the real 3.5x longer prompt
        time.sleep(0.3)
        return slow_prefill(*args, **kwargs)

    target.prefill = prefill
    out = run_parallel(draft, target, sample, DrafterFactory("eventgpt"), max_new_tokens=12, gamma=3,
                       max_free_tokens=6)
    target.prefill = slow_prefill
    with torch.no_grad():
        from common.pipeline import prefill_sample

        alone = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=12)
    assert out.result.tokens == alone.tokens
    assert out.overlap_window > 0.2 and len(out.free_tokens) >= 1
    assert 0 <= out.accepted_free_tokens <= len(out.free_tokens)
    lanes = {i["lane"] for i in out.intervals}
    assert {"draft", "target"} <= lanes
    free = [i for i in out.intervals if i["label"] == "free draft"]
    assert free and all(i["end"] <= out.target_prefill_end + 0.05 for i in free[:-1])


def test_benchmark_writes_a_complete_lossless_run(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    out = bp.main(["--dataset_dir", str(tiny_dataset), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
                   "--videollava_path", str(tiny_models_dir / "videollava"), "--output_dir", str(tmp_path),
                   "--task_name", "t", "--max_samples", "3", "--max_new_tokens", "10", "--gamma", "3",
                   "--warmup_steps", "0"])
    stats = out["statistics"]
    assert stats["num_samples"] == 3 and stats["lossless_rate"] == 1.0
    for key in ("speedup_measured", "speedup_predicted", "overlap_window_ms_avg", "free_draft_tokens_avg",
                "accepted_free_tokens_avg"):
        assert key in stats
    run = tmp_path / out["run_dir"].split("/")[-1]
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "results.json", "RESULTS.md", "timeline.png", "speedup_vs_acceptance.png"} <= names
    sample = read_json(run / "results.json")["samples"][0]
    for key in ("videollava_time", "parallel_time", "identical", "overlap_window_ms", "free_draft_tokens",
                "accepted_free_tokens", "egpt_stage4_time", "videollava_stage4_time", "timeline"):
        assert key in sample
