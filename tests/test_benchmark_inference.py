"""benchmark_inference end to end on the tiny pair: lossless, resumable, bad samples recorded."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmark_inference import benchmark_inference as bi
from common.results import read_json
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)


def _argv(models, dataset, out, *extra):
    return ["--dataset_dir", str(dataset), "--eventgpt_path", str(models / "eventgpt"),
            "--videollava_path", str(models / "videollava"), "--output_dir", str(out), "--task_name", "t",
            "--max_new_tokens", "12", "--gamma", "3", "--warmup_steps", "0", *extra]


def test_runs_lossless_and_writes_the_run_folder(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    out = bi.main(_argv(tiny_models_dir, tiny_dataset, tmp_path, "--max_samples", "2"))
    stats = out["statistics"]
    assert stats["num_samples"] == 2 and stats["sd_lossless_rate"] == 1.0
    for key in ("acceptance_rate_avg", "sd_acceptance_rate_avg", "sd_mean_accepted_length_avg",
                "sd_speedup_measured", "sd_speedup_predicted", "videollava_stage4_time_avg"):
        assert key in stats
    run = tmp_path / out["run_dir"].split("/")[-1]
    results = read_json(run / "results.json")
    sample = results["samples"][0]
    for key in ("id", "split", "query", "event_data", "video_data", "egpt", "egpt_time", "egpt_token_ids",
                "videollava", "videollava_time", "videollava_token_ids", "egpt_stage1_time",
                "videollava_stage5_time", "sd_videollava", "sd_identical", "sd_time", "sd_acceptance_rate",
                "sd_mean_accepted_length"):
        assert key in sample
    assert sample["sd_identical"] is True
    assert {"config.json", "RESULTS.md", "stage_breakdown.png", "DONE"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "config.json").read_text())["argv"]


def test_resumes_after_interruption(tiny_models_dir, tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    real = bi.process_sample
    calls = []

    def interrupted(draft, target, sample, args, make_drafter):
        calls.append(sample.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(draft, target, sample, args, make_drafter)

    monkeypatch.setattr(bi, "process_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bi.main(_argv(tiny_models_dir, tiny_dataset, tmp_path, "--max_samples", "3"))
    monkeypatch.setattr(bi, "process_sample", lambda *a: (calls.append(a[2].id), real(*a))[1])
    out = bi.main(_argv(tiny_models_dir, tiny_dataset, tmp_path, "--max_samples", "3"))
    ids = [r["id"] for r in read_json(tmp_path / out["run_dir"].split("/")[-1] / "results.json")["samples"]]
    assert len(ids) == len(set(ids)) == 3
    assert calls.count(calls[0]) == 1  # the finished first sample was not computed again


def test_bad_sample_is_recorded_and_skipped(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    index = read_json(data / "EventGPT_Instruction_Subset.json")
    mp4 = data / index[0]["mp4_data"]
    mp4.write_bytes(mp4.read_bytes()[:200])  # truncated video
    shutil.rmtree(data / index[0]["video_data"], ignore_errors=True)
    out = bi.main(_argv(tiny_models_dir, data, tmp_path / "out", "--max_samples", "2"))
    samples = read_json(tmp_path / "out" / out["run_dir"].split("/")[-1] / "results.json")["samples"]
    bad = [s for s in samples if "error" in s]
    assert len(bad) == 1 and str(mp4.name) in bad[0]["error"]
    assert out["statistics"]["num_samples"] == 1 and out["statistics"]["num_failed"] == 1


def test_token_adapter_drafter_reports_aligned_metrics(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    from common.drafters.token_adapter import TokenAdapter, TokenAdapterConfig
    from common.models.loader import load_vlm

    draft = load_vlm("eventgpt", tiny_models_dir / "eventgpt", device="cpu")
    target = load_vlm("videollava", tiny_models_dir / "videollava", device="cpu")
    TokenAdapter(TokenAdapterConfig(draft_vocab_size=draft.vocab_size, target_vocab_size=target.vocab_size,
                                    vocab_limit=min(draft.base_vocab_size, target.base_vocab_size), d_model=32,
                                    n_layers=1, n_heads=2)).save_pretrained(tmp_path / "adapter")
    out = bi.main(_argv(tiny_models_dir, tiny_dataset, tmp_path / "out", "--max_samples", "1",
                        "--use_token_adapter", "--token_adapter_path", str(tmp_path / "adapter")))
    stats = out["statistics"]
    assert stats["drafter"] == "token_adapter" and stats["sd_lossless_rate"] == 1.0
    config = read_json(tmp_path / "out" / out["run_dir"].split("/")[-1] / "config.json")  # the harness run records the checkpoint it used
    assert config["drafter"] == {"kind": "token_adapter", "checkpoint": str(tmp_path / "adapter")}
    for key in ("aligned_acceptance_rate_avg", "aligned_acceptance_rate_std", "aligned_top5_rate_avg",
                "aligned_improvement"):
        assert key in stats


def test_eagle_drafter_flag_is_lossless_in_both_benchmarks(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    from benchmark_parallel_prefill import benchmark_parallel_prefill as bp
    from common.drafters.eagle_head import EagleHead, EagleHeadConfig, save_eagle_head
    from common.models.loader import load_vlm

    target = load_vlm("videollava", tiny_models_dir / "videollava", device="cpu")
    save_eagle_head(EagleHead(EagleHeadConfig.for_target(target)), tmp_path / "eagle")
    flags = ["--max_samples", "2", "--drafter", "eagle", "--eagle_head", str(tmp_path / "eagle")]
    sequential = bi.main(_argv(tiny_models_dir, tiny_dataset, tmp_path / "seq", *flags))["statistics"]
    parallel = bp.main(_argv(tiny_models_dir, tiny_dataset, tmp_path / "par", *flags))["statistics"]
    assert sequential["drafter"] == parallel["drafter"] == "eagle"
    assert sequential["sd_lossless_rate"] == 1.0 and parallel["lossless_rate"] == 1.0
