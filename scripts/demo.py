"""The main job end to end on the embedded default (``make demo``): CPU, minutes.

    python -m scripts.demo [--output_dir results/demo --max_samples 6 --skip_alignment]

Runs on the default pair (models/, else random tiny models) and the default synthetic split:
1. benchmark_inference (stage times, raw agreement, sequential lossless speculation),
2. benchmark_parallel_prefill (concurrent prefill, free draft tokens, speculation),
3. a small token-alignment run and a small feature-alignment run,
then writes ``results/demo/SUMMARY.md`` with the key numbers of THIS run (sizes, n, spread; every
learned drafter next to raw EventGPT drafting, teacher forced and live) and links to the PNGs, and
rewrites ``results/INDEX.md``. Run folders: ``<output_dir>/<stage>/demo_<timestamp>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any


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


def _records(run_dir: str | Path) -> list[dict]:
    return json.loads((Path(run_dir) / "results.json").read_text()).get("samples", [])


def run_benchmarks(common_argv: list[str], out: Path) -> dict[str, Any]:
    """Both benchmarks; returns their statistics, records, seconds and the PNGs copied next to SUMMARY.md."""
    from benchmark_inference.benchmark_inference import main as bench_inference
    from benchmark_parallel_prefill.benchmark_parallel_prefill import main as bench_parallel

    done: dict[str, Any] = {"pngs": []}
    for key, run, folder in (("inference", bench_inference, "benchmark_inference"),
                             ("parallel", bench_parallel, "benchmark_parallel_prefill")):
        t0 = time.perf_counter()
        res = run([*common_argv, "--output_dir", str(out / folder)])
        done[key] = {"statistics": res["statistics"], "records": _records(res["run_dir"]),
                     "seconds": time.perf_counter() - t0}
        done["pngs"] += _copy_pngs(Path(res["run_dir"]), out, key)
    return done


def run_alignment(args: argparse.Namespace, model_argv: list[str], out: Path) -> dict[str, Any]:
    """A small token-alignment and a small feature-alignment run on the default train/test splits."""
    from common.defaults import default_train_split
    from feature_alignment.extract_hidden_states import main as extract_hidden
    from feature_alignment.train_hidden_adapter import main as train_hidden
    from token_alignment.extract_tokens import main as extract_tokens
    from token_alignment.train_and_evaluate import main as train_tokens

    base = ["--dataset_dir", str(default_train_split()), *model_argv, "--device", "cpu",
            "--max_new_tokens", str(args.max_new_tokens)]
    sizes = (("train", args.align_train_samples), ("test", args.max_samples))
    t0 = time.perf_counter()
    files = {}
    for split, n in sizes:
        files[split] = out / "data" / f"tokens_{split}.jsonl"
        extract_tokens([*base, "--split", split, "--max_samples", str(n), "--parallel",
                        "--output_file", str(files[split])])
    token = train_tokens(["--train_tokens", str(files["train"]), "--test_tokens", str(files["test"]),
                          "--task_name", "demo", "--output_dir", str(out / "token_alignment"),
                          "--epochs", "8", "--d_model", "64", "--n_layers", "2", "--live_samples", "3",
                          "--gamma", str(args.gamma), *base])
    token_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    hidden = {}
    for split, n in sizes:
        hidden[split] = out / "data" / f"hidden_{split}"
        extract_hidden([*base, "--split", split, "--max_samples", str(n), "--layers", "-1",
                        "--output_dir", str(hidden[split])])
    feature = train_hidden(["--train_dir", str(hidden["train"]), "--test_dir", str(hidden["test"]),
                            "--adapter_level", "1", "--epochs", "8", "--results_dir",
                            str(out / "feature_alignment"), "--task_name", "demo_L1", "--no_resume"])
    return {"token": token["statistics"], "token_seconds": token_seconds, "feature": feature,
            "feature_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    from common.defaults import default_dataset_dir, default_model_path
    from common.results import atomic_write_text
    from common.run_index import results_root_of, update_index
    from scripts.demo_summary import drafter_rows, inference_rows, parallel_rows, render_summary, run_sizes

    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models on a small CPU: one intra-op thread per model lane
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dataset = default_dataset_dir()
    egpt, vllava = default_model_path("eventgpt"), default_model_path("videollava")
    common_argv = ["--dataset_dir", str(dataset), "--split", "test", "--eventgpt_path", str(egpt),
                   "--videollava_path", str(vllava), "--max_samples", str(args.max_samples),
                   "--max_new_tokens", str(args.max_new_tokens), "--gamma", str(args.gamma),
                   "--task_name", "demo", "--no_resume", "--device", "cpu"]
    bench = run_benchmarks(common_argv, out)
    align = None if args.skip_alignment else run_alignment(args, common_argv[4:8], out)
    seconds = time.perf_counter() - started
    inf, par = bench["inference"], bench["parallel"]
    rows = inference_rows(inf["statistics"], inf["records"], args.gamma) + \
        parallel_rows(par["statistics"], par["records"])
    drafters = drafter_rows(align["token"], align["feature"]) if align else []
    trained = "the shipped trained pair (models/)" if egpt.parent.name == "models" else \
        "RANDOM tiny models (no shipped pair found): acceptance numbers are noise"
    header = [f"Models: {trained}: `{egpt}`, `{vllava}`. Data: `{dataset}` (synthetic, test split).",
              f"Command: `{' '.join(['python -m scripts.demo', *(argv or [])])}`; {seconds:.0f} s on this machine "
              f"(1 torch thread, CPU): benchmarks {inf['seconds']:.0f} + {par['seconds']:.0f} s"
              + (f", alignment {align['token_seconds']:.0f} + {align['feature_seconds']:.0f} s." if align else ".")]
    text = render_summary(header, run_sizes(args, inf["records"], align and align["token"]), rows, drafters,
                          bench["pngs"])
    atomic_write_text(out / "SUMMARY.md", text)
    update_index(results_root_of(out, fallback=out))
    print(text)
    print(f"\nSummary: {out / 'SUMMARY.md'}")
    return {"summary": str(out / "SUMMARY.md"), "rows": rows, "drafters": drafters, "seconds": seconds}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
