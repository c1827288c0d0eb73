"""Merge benchmark run folders of one job split across GPUs/processes into one results.json.

    python -m scripts.merge_results RUN_DIR [RUN_DIR ...] --output_dir O [--task_name merged]

Each RUN_DIR is a finished run of the same benchmark (``--num_chunks N --chunk_idx i``).
Samples are concatenated in chunk order (a sample id present twice must be identical, else the
merge stops), and ``statistics`` are recomputed over all samples with the benchmark's own
function, so merged numbers equal those of a single run over the same samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.results import RunFolder, read_json
from common.run_index import results_root_of, update_index

STAGES = ("benchmark_inference", "benchmark_parallel_prefill")


def _stage_and_args(run_dir: Path) -> tuple[str, dict]:
    stage = read_json(run_dir / "results.json").get("stage")
    if stage not in STAGES:
        raise SystemExit(f"{run_dir}/results.json: no benchmark stage recorded (expected one of {STAGES})")
    return stage, read_json(run_dir / "config.json").get("args", {})


def _chunk_index(args: dict) -> int:
    return int(args.get("chunk_idx") or 0)


def merge_records(runs: list[tuple[Path, dict]]) -> list[dict]:
    """Records of all runs in chunk order; duplicates must agree."""
    merged: dict[str, dict] = {}
    for run_dir, _ in sorted(runs, key=lambda r: _chunk_index(r[1])):
        for record in read_json(run_dir / "results.json")["samples"]:
            previous = merged.get(record["id"])
            if previous is not None and previous.get("error") is None and record.get("error") is None \
                    and previous.get("videollava_token_ids") != record.get("videollava_token_ids"):
                raise SystemExit(f"{run_dir}: sample {record['id']} differs from an earlier chunk's")
            merged.setdefault(record["id"], record)
    return list(merged.values())


def recompute(stage: str, records: list[dict], args: dict, chunk_stats: list[dict]) -> dict[str, Any]:
    """Statistics over all samples with the benchmark's own function."""
    gamma = int(args.get("gamma", 5))
    if stage == "benchmark_inference":
        from benchmark_inference.benchmark_inference import compute_statistics

        return compute_statistics(records, gamma)
    from benchmark_parallel_prefill.benchmark_parallel_prefill import compute_statistics

    costs = [s.get("cost_ratio_c") for s in chunk_stats if s.get("cost_ratio_c") is not None]
    return compute_statistics(records, gamma, sum(costs) / len(costs) if costs else None)


def write_readouts(stage: str, run: RunFolder, records: list[dict], stats: dict[str, Any], args: dict,
                   argv: list[str]) -> None:
    """results.json, RESULTS.md and PNGs through the benchmark's own renderer (as a single run writes them)."""
    for key in ("decode_mode", "drafter", "draft_device", "target_device"):
        stats.setdefault(key, args.get(key))
    if stage == "benchmark_inference":
        from benchmark_inference.benchmark_inference import write_readouts as write

        write(run, records, stats, argv, args.get("quant"))
    else:
        from benchmark_parallel_prefill.benchmark_parallel_prefill import write_readouts as write

        write(run, records, stats, argv, str(stats.get("drafter") or args.get("drafter") or "eventgpt"),
              args.get("quant"))
    text = (run.path / "RESULTS.md").read_text()
    note = f"Merged from {len(stats['merged_from'])} run folders: " + ", ".join(
        f"`{p}`" for p in stats["merged_from"]) + "; statistics recomputed over all samples.\n"
    run.write_markdown(text.rstrip("\n") + "\n\n" + note)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m scripts.merge_results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="finished run folders of one benchmark")
    parser.add_argument("--output_dir", default=None, help="base folder of the merged run (default results/<stage>)")
    parser.add_argument("--task_name", default="merged", help="name of the merged run (default merged)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    runs = []
    for raw in args.run_dirs:
        run_dir = Path(raw)
        if not (run_dir / "results.json").is_file():
            raise SystemExit(f"{run_dir}: no results.json (is the run finished?)")
        runs.append((run_dir, *_stage_and_args(run_dir)))
    stages = {stage for _, stage, _ in runs}
    if len(stages) != 1:
        raise SystemExit(f"cannot merge runs of different benchmarks: {sorted(stages)}")
    stage = stages.pop()
    records = merge_records([(r, a) for r, _, a in runs])
    chunk_stats = [read_json(r / "results.json").get("statistics", {}) for r, _, _ in runs]
    stats = recompute(stage, records, runs[0][2], chunk_stats)
    stats["merged_from"] = [str(r) for r, _, _ in runs]
    stats["device"] = chunk_stats[0].get("device")  # where the shards ran (their timing notice)
    out = RunFolder.create(stage, args.task_name, args.output_dir, resume=False)
    argv_used = list(argv if argv is not None else sys.argv[1:])
    out.write_config({"merged_from": [str(r) for r, _, _ in runs]}, argv_used)
    write_readouts(stage, out, records, stats, runs[0][2], argv_used)
    out.mark_done()
    update_index(results_root_of(out.path))
    print(f"merged {len(records)} samples -> {out.path}")
    return {"run_dir": str(out.path), "statistics": stats, "num_samples": len(records)}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
