"""The main job end to end on the embedded default (``make demo``): CPU, minutes.

    python -m scripts.demo [--output_dir results/demo --max_samples 6 --skip_alignment]

Runs on the default pair (models/, else random tiny models) and the default synthetic split:
1. benchmark_inference (stage times, raw agreement, sequential lossless speculation),
2. benchmark_parallel_prefill (concurrent prefill, free draft tokens, speculation),
3. a small token-alignment run and a small feature-alignment run, when those stages exist,
then writes ``results/demo/SUMMARY.md`` with the key numbers of THIS run and links to the PNGs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from common.defaults import default_dataset_dir, default_model_path, default_train_split
from common.results import atomic_write_text, markdown_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="results/demo", help="where the demo's runs and SUMMARY.md go")
    p.add_argument("--max_samples", type=int, default=6, help="samples per benchmark (default 6)")
    p.add_argument("--max_new_tokens", type=int, default=30, help="tokens per answer (default 30)")
    p.add_argument("--gamma", type=int, default=3, help="draft tokens per step (default 3)")
    p.add_argument("--align_train_samples", type=int, default=16,
                   help="train samples extracted for the small alignment runs (default 16)")
    p.add_argument("--skip_alignment", action="store_true", help="only the two benchmarks")
    return p


def _copy_pngs(run_dir: Path, out: Path, prefix: str) -> list[str]:
    names = []
    for png in sorted(run_dir.glob("*.png")):
        target = out / f"{prefix}_{png.name}"
        shutil.copyfile(png, target)
        names.append(target.name)
    return names


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_benchmarks(args, common_argv: list[str], out: Path) -> tuple[list[dict], list[str]]:
    """Both benchmarks; returns summary rows and the PNGs copied next to SUMMARY.md."""
    from benchmark_inference.benchmark_inference import main as bench_inference
    from benchmark_parallel_prefill.benchmark_parallel_prefill import main as bench_parallel

    rows, pngs = [], []
    t0 = time.perf_counter()
    inf = bench_inference([*common_argv, "--output_dir", str(out / "benchmark_inference")])
    s = inf["statistics"]
    pngs += _copy_pngs(Path(inf["run_dir"]), out, "inference")
    rows += [
        {"stage": "benchmark_inference", "metric": "EventGPT prefill / decode ms per token",
         "value": f"{1000 * s['egpt_stage4_time_avg']:.1f} / {s['egpt_decode_ms_per_token_avg']:.1f}"},
        {"stage": "benchmark_inference", "metric": "Video-LLaVA prefill / decode ms per token",
         "value": f"{1000 * s['videollava_stage4_time_avg']:.1f} / {s['videollava_decode_ms_per_token_avg']:.1f}"},
        {"stage": "benchmark_inference", "metric": "raw token agreement (index-aligned)", "value": _fmt(s["acceptance_rate_avg"])},
        {"stage": "benchmark_inference", "metric": "SD acceptance rate / mean accepted length",
         "value": f"{s['sd_acceptance_rate_avg']:.3f} / {s['sd_mean_accepted_length_avg']:.2f}"},
        {"stage": "benchmark_inference", "metric": "draft/target step cost ratio c (measured)",
         "value": _fmt(s["sd_cost_ratio_c"])},
        {"stage": "benchmark_inference", "metric": "SD speedup measured (end to end) / Leviathan predicted (decode)",
         "value": f"{s['sd_speedup_measured']:.2f} / {_fmt(s['sd_speedup_predicted'])}"},
        {"stage": "benchmark_inference", "metric": "SD lossless rate", "value": _fmt(s["sd_lossless_rate"])},
        {"stage": "benchmark_inference", "metric": "seconds", "value": f"{time.perf_counter() - t0:.0f}"},
    ]
    t0 = time.perf_counter()
    par = bench_parallel([*common_argv, "--output_dir", str(out / "benchmark_parallel_prefill")])
    s = par["statistics"]
    pngs += _copy_pngs(Path(par["run_dir"]), out, "parallel")
    rows += [
        {"stage": "benchmark_parallel_prefill", "metric": "overlap window ms / free draft tokens / accepted free",
         "value": f"{s['overlap_window_ms_avg']:.1f} / {s['free_draft_tokens_avg']:.2f} / {s['accepted_free_tokens_avg']:.2f}"},
        {"stage": "benchmark_parallel_prefill", "metric": "acceptance rate / mean accepted length",
         "value": f"{_fmt(s['acceptance_rate_avg'])} / {_fmt(s['mean_accepted_length_avg'])}"},
        {"stage": "benchmark_parallel_prefill", "metric": "speedup measured / Leviathan predicted",
         "value": f"{s['speedup_measured']:.2f} / {_fmt(s['speedup_predicted'])}"},
        {"stage": "benchmark_parallel_prefill", "metric": "lossless rate", "value": _fmt(s["lossless_rate"])},
        {"stage": "benchmark_parallel_prefill", "metric": "seconds", "value": f"{time.perf_counter() - t0:.0f}"},
    ]
    return rows, pngs


def run_alignment(args, model_argv: list[str], out: Path) -> list[dict]:
    """A small token-alignment and a small feature-alignment run on the default train/test splits."""
    from feature_alignment.extract_hidden_states import main as extract_hidden
    from feature_alignment.train_hidden_adapter import main as train_hidden
    from token_alignment.extract_tokens import main as extract_tokens
    from token_alignment.train_and_evaluate import main as train_tokens

    dataset = str(default_train_split())
    base = ["--dataset_dir", dataset, *model_argv, "--device", "cpu", "--max_new_tokens", str(args.max_new_tokens)]
    rows: list[dict] = []
    t0 = time.perf_counter()
    files = {}
    for split, n in (("train", args.align_train_samples), ("test", args.max_samples)):
        files[split] = out / "token_alignment" / f"tokens_{split}.jsonl"
        extract_tokens([*base, "--split", split, "--max_samples", str(n), "--parallel",
                        "--output_file", str(files[split])])
    result = train_tokens(["--train_tokens", str(files["train"]), "--test_tokens", str(files["test"]),
                           "--task_name", "demo", "--output_dir", str(out / "token_alignment" / "task"),
                           "--epochs", "8", "--d_model", "64", "--n_layers", "2", "--live_samples", "3",
                           "--gamma", str(args.gamma), *base])
    stats = result["statistics"]
    tf, live = stats["test_teacher_forced"], stats.get("live") or {}
    rows.append({"stage": "token_alignment", "metric": "teacher-forced top-1 on test: raw draft token / TokenAdapter",
                 "value": f"{_fmt(tf.get('baseline_position_match'))} / {_fmt(tf.get('adapter_top1'))}"})
    raw, ada = live.get("raw", {}), live.get("adapter", {})
    rows.append({"stage": "token_alignment", "metric": "live acceptance: raw EventGPT / TokenAdapter (lossless rate)",
                 "value": f"{_fmt(raw.get('acceptance_rate'))} / {_fmt(ada.get('acceptance_rate'))} "
                          f"({_fmt(ada.get('lossless_rate'))})"})
    rows.append({"stage": "token_alignment", "metric": "seconds", "value": f"{time.perf_counter() - t0:.0f}"})
    t0 = time.perf_counter()
    hidden = {}
    for split, n in (("train", args.align_train_samples), ("test", args.max_samples)):
        hidden[split] = out / "feature_alignment" / f"hidden_{split}"
        extract_hidden([*base, "--split", split, "--max_samples", str(n), "--layers", "-1",
                        "--output_dir", str(hidden[split])])
    trained = train_hidden(["--train_dir", str(hidden["train"]), "--test_dir", str(hidden["test"]),
                            "--adapter_level", "1", "--epochs", "8", "--output_dir",
                            str(out / "feature_alignment" / "L1")])
    test = trained.get("test") or {}
    rows.append({"stage": "feature_alignment", "metric": "L1 adapter on test: cosine / acc@0.90 / top-1 via target LM head",
                 "value": f"{_fmt(test.get('cos'))} / {_fmt(test.get('acc@0.90'))} / {_fmt(test.get('top1'))}"})
    rows.append({"stage": "feature_alignment", "metric": "seconds", "value": f"{time.perf_counter() - t0:.0f}"})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models on a small CPU: one intra-op thread per model lane
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dataset = default_dataset_dir()
    egpt, vllava = default_model_path("eventgpt"), default_model_path("videollava")
    common_argv = ["--dataset_dir", str(dataset), "--eventgpt_path", str(egpt), "--videollava_path", str(vllava),
                   "--max_samples", str(args.max_samples), "--max_new_tokens", str(args.max_new_tokens),
                   "--gamma", str(args.gamma), "--task_name", "demo", "--no_resume", "--device", "cpu"]
    rows, pngs = run_benchmarks(args, common_argv, out)
    if not args.skip_alignment:
        rows += run_alignment(args, common_argv[2:6], out)
    seconds = time.perf_counter() - started
    trained = "the shipped trained pair (models/)" if egpt.parent.name == "models" else \
        "RANDOM tiny models (no shipped pair found): acceptance numbers are noise"
    text = "\n".join([
        "# Demo summary", "",
        f"Models: {trained}: `{egpt}`, `{vllava}`.", f"Data: `{dataset}` (synthetic).",
        f"Command: `python -m scripts.demo {' '.join(argv or [])}`; {seconds:.0f} s on this machine "
        f"({torch.get_num_threads()} torch thread, CPU).", "",
        markdown_table(rows), "",
        "Speedups are wall clock measured in this run on a CPU with tiny models (Python overhead dominates "
        "their steps, so c is far from the GPU's); predictions are Leviathan's formula from the measured "
        "acceptance and cost ratio c. Every speculative output is checked against the target's own output "
        "(lossless rate).", "",
        "## Plots", "", *[f"![{name}]({name})" for name in pngs], "",
    ])
    atomic_write_text(out / "SUMMARY.md", text)
    print(text)
    print(f"\nSummary: {out / 'SUMMARY.md'}")
    return {"summary": str(out / "SUMMARY.md"), "rows": rows, "seconds": seconds}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
