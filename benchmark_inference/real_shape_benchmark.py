"""GPU timings of both models at the real 7B shapes (random weights) through the real loaders.

    python -m benchmark_inference.real_shape_benchmark --quant bf16 [--models_dir /tmp/real_shape_models
        --decode_modes eager,cuda_graph --hf_generate dynamic,static --new_tokens 50 --gamma 5]

Builds Vicuna-7B + CLIP ViT-L/14 shaped EventGPT (336 px, 5 event frames -> 582 tokens) and
Video-LLaVA (224 px, 8 frames -> 2056 tokens) with random weights, saves them as checkpoints,
loads them with ``load_vlm`` (``--quant`` bf16/fp16/4bit/8bit), and measures per model: vision
encode, LLM prefill, decode ms/token (eager and CUDA-graph), the cost of verifying gamma+1
tokens relative to decoding one, and for the target HF ``generate`` (dynamic and static cache)
on the same weights in the same run. Prints a table and writes results.json + RESULTS.md.

``--engine`` (issue 15) instead measures, in one run on one GPU, the engine's figures of merit at
Video-LLaVA-7B shapes: our decode ms/token (CUDA graphs, with and without the Triton kernels),
transformers ``generate`` with a static cache and a ~30-line ``torch.compile`` loop over HF's
``StaticCache`` on the same weights, verify(gamma+1)/decode(1), the EAGLE head's draft cost c,
the 2069-token prefill, and the target's prefill slowdown with the draft running beside it plus
the free draft tokens it managed, and (bitsandbytes importable, ``--quant bf16``) the 4-bit target's
decode ms/token and verify/decode with and without the Triton nf4 kernel; written to ``--engine_json`` (default output_dir/engine_<quant>.json).

    python -m benchmark_inference.real_shape_benchmark --engine --engine_json docs/gpu_runs/engine_h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmark_inference.real_shape_timing import (  # noqa: F401  (re-exported for existing imports)
    QUESTION,
    decode_ms_per_token,
    hf_generate,
    raw_inputs,
    timed_median,
    verify_ratio,
)
from common.models.loader import load_vlm
from common.models.real_shape import write_real_shape_pair
from common.results import atomic_write_json, atomic_write_text, markdown_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_inference.real_shape_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", default="bf16", choices=["bf16", "fp16", "4bit", "8bit"], help="precision (default bf16)")
    p.add_argument("--models_dir", default="/tmp/real_shape_models", help="where the random 7B checkpoints are written")
    p.add_argument("--output_dir", default="results/real_shape", help="folder for results.json and RESULTS.md")
    p.add_argument("--decode_modes", default="eager,cuda_graph,compiled_graph",
                   help="comma list of eager, cuda_graph, compiled_graph (torch.compile + CUDA graph)")
    p.add_argument("--hf_generate", default="dynamic,static", help="comma list of HF generate caches to time ('' = none)")
    p.add_argument("--new_tokens", type=int, default=50, help="tokens per decode measurement (default 50)")
    p.add_argument("--gamma", type=int, default=5, help="verify step = gamma + 1 tokens (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of encode/prefill timings (median)")
    p.add_argument("--models", default="eventgpt,videollava", help="which models to time")
    p.add_argument("--engine", action="store_true", help="the engine report of issue 15 instead (see above)")
    p.add_argument("--engine_json", default=None, help="where --engine writes its JSON "
                                                       "(default: output_dir/engine_<quant>.json)")
    p.add_argument("--engine_modes", default="cuda_graph,fused_graph",
                   help="our decode modes for --engine: cuda_graph, fused_graph (Triton kernels), eager")
    p.add_argument("--no_baselines", action="store_true", help="--engine without HF generate / torch.compile loop")
    p.add_argument("--no_4bit", action="store_true", help="--engine without the 4-bit (nf4) target's decode and "
                                                       "verify (measured after the bf16 report when bitsandbytes imports)")
    return p


def measure_model(kind: str, vlm, args) -> dict[str, Any]:
    """Stage and decode timings of one model."""
    raw = raw_inputs(kind)
    row: dict[str, Any] = {"model": kind, "quant": args.quant}
    t_pre, pixels = timed_median(lambda: vlm.preprocess(raw), args.repeats, vlm.device)
    t_enc, visual = timed_median(lambda: vlm.encode_pixels(pixels), args.repeats, vlm.device)
    t_fill, state = timed_median(lambda: vlm.prefill(visual, QUESTION), args.repeats, vlm.device)
    row.update(visual_tokens=visual.num_tokens, prompt_tokens=state.prompt_length,
               preprocess_ms=1000 * t_pre, vision_encode_ms=1000 * t_enc, prefill_ms=1000 * t_fill)
    for mode in [m for m in args.decode_modes.split(",") if m]:
        try:
            if mode in ("cuda_graph", "compiled_graph", "fused_graph"):
                t0 = time.perf_counter()
                vlm.enable_cuda_graphs(state.prompt_length + args.new_tokens + 4 * (args.gamma + 1),
                                       step_sizes=(1, args.gamma + 1), compile=mode == "compiled_graph",
                                       kernels=mode == "fused_graph")
                row[f"capture_s_{mode}"] = time.perf_counter() - t0
            row[f"decode_ms_per_token_{mode}"] = decode_ms_per_token(vlm, visual, args.new_tokens)
            row[f"verify{args.gamma + 1}_over_decode1_{mode}"] = verify_ratio(vlm, visual, args.gamma + 1)
        except Exception as exc:  # report, keep measuring the rest
            row[f"decode_ms_per_token_{mode}"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            vlm.disable_cuda_graphs()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.engine:
        from benchmark_inference.engine_report import run_engine_report

        return run_engine_report(args, argv)
    if not torch.cuda.is_available():
        raise SystemExit("real_shape_benchmark needs a CUDA device")
    started = time.perf_counter()
    paths = write_real_shape_pair(args.models_dir)
    print(f"checkpoints ready in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for kind in args.models.split(","):
        vlm = load_vlm(kind, paths[kind], quant=args.quant, device="cuda")
        with torch.no_grad():
            rows.append(measure_model(kind, vlm, args))
            print(rows[-1], flush=True)
            if kind == "videollava":
                for cache in [c for c in args.hf_generate.split(",") if c]:
                    rows.append(hf_generate(vlm, cache, args.new_tokens))
                    print(rows[-1], flush=True)
        del vlm
        torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "argv": argv, "rows": rows}
    out = Path(args.output_dir)
    atomic_write_json(out / f"results_{args.quant}.json", info)
    table = markdown_table(rows, floatfmt=".2f")
    atomic_write_text(out / f"RESULTS_{args.quant}.md",
                      f"# Real-shape timings ({info['device']}, {info['date']}, {args.quant})\n\n"
                      f"`python -m benchmark_inference.real_shape_benchmark {' '.join(argv)}`\n\n{table}\n")
    print(table)
    return info


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
