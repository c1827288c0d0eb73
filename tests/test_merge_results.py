"""Sharded benchmark runs merge into the same samples and statistics as one run."""

from __future__ import annotations

from pathlib import Path

from benchmark_inference import benchmark_inference as bi
from scripts.merge_results import main as merge
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)


def test_two_chunks_merge_to_the_single_run(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    base = ["--dataset_dir", str(tiny_dataset), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
            "--videollava_path", str(tiny_models_dir / "videollava"), "--max_new_tokens", "8", "--gamma", "2",
            "--warmup_steps", "0", "--output_dir", str(tmp_path / "runs")]
    single = bi.main([*base, "--task_name", "single"])
    chunks = [bi.main([*base, "--task_name", f"chunk{i}", "--num_chunks", "2", "--chunk_idx", str(i)])
              for i in range(2)]
    merged = merge([c["run_dir"] for c in reversed(chunks)] + ["--output_dir", str(tmp_path / "merged")])
    from common.results import read_json

    ids = [s["id"] for s in read_json(f"{merged['run_dir']}/results.json")["samples"]]
    single_ids = [s["id"] for s in read_json(f"{single['run_dir']}/results.json")["samples"]]
    assert ids == single_ids
    for key in ("num_samples", "sd_lossless_rate", "acceptance_rate_avg", "sd_acceptance_rate_avg"):
        assert merged["statistics"][key] == single["statistics"][key]
    # merged shards carry the same timing notice as a single run, and their own RESULTS.md
    from common.harness import CPU_NOTICE

    text = (Path(merged["run_dir"]) / "RESULTS.md").read_text()
    assert CPU_NOTICE in text and "Merged from 2 run folders" in text
    assert text.count(CPU_NOTICE) == (Path(single["run_dir"]) / "RESULTS.md").read_text().count(CPU_NOTICE) == 1
