"""Decode/verify linears at Vicuna-7B shapes: cuBLAS vs the Triton GEMV, and where a 4-bit verify step goes.

    python -m benchmark_inference.gemv_profile --json $OUT/gemv.json [--sections gemv,step,nf4_floor,nf4_step]

Random bf16 weights on the GPU (no checkpoint), in one run (about a minute on an H200):
- ``gemv``: per weight shape (fused q/k/v, o, fused gate/up, down, LM head) at 1 and 6 rows, cuBLAS
  ``F.linear`` vs ``common.models.gemv`` (its chosen tile, then every tile timed alone after an L2
  flush), GPU ms and GB/s, each timed as one CUDA graph over enough weight copies to defeat the L2 cache; then every weight of a
  decoder step (layers x 4 fused matrices + LM head) as one graph of cuBLAS vs one of Triton GEMVs;
- ``step``: the fused decode step (``use_kernels``) of a LLaMA-7B-shaped decoder as CUDA graphs of 1
  and 6 rows, ``gemv="cublas"`` vs ``"triton"`` (``verify_over_decode`` = replay(6) / replay(1));
- ``nf4_step``: the same decoder in bitsandbytes nf4: the eager 1-row and 6-row steps broken down per
  op class under ``torch.profiler``, then graph replays of 1 and 6 rows for each multi-row path
  (bitsandbytes, the Triton nf4 kernel, its tensor-core kernel ``nf4_triton_tc``, dequantize into a
  scratch matrix + cuBLAS or + the GEMV), each with its ``verify_over_decode_4bit``;
- ``nf4_floor`` (not run by default): the step's nf4 matmuls alone, per shape and tile and as a whole
  (``benchmark_inference.nf4_profile``); it tunes the ``nf4_triton_tc`` table that a later
  ``nf4_step`` in the same run uses.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch.nn import functional as F

from benchmark_inference.prefill_profile import breakdown, build_runner, graph_ms, time_ms
from benchmark_inference.profile_report import ProfileReport
from common.models.decoder import CudaGraphDecoder

SECTIONS = ("gemv", "step", "nf4_floor", "nf4_step")
DEFAULT_SECTIONS = ("gemv", "step", "nf4_step")
NF4_CLASSES = (("nf4_matmul", r"gemv_4bit|gemm_4bit|kgemm|_nf4_|_sum_parts"),
               ("dequantize", r"dequant"),
               ("gemv_triton", r"_gemv_kernel|_gemv_sum"),
               ("attention", r"split_attn|_combine|flash|sdpa|attention"),
               ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|wgmma|gemv"),
               ("fused_elementwise", r"add_rms_norm|rope_kv|silu_mul"),
               ("copy", r"copy|cat|index|fill|memset|memcpy"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_inference.gemv_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where the results JSON goes")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--context", type=int, default=2069, help="live cache length for the step sections")
    p.add_argument("--rows", default="1,6", help="rows of the decode and the verify step (default 1,6)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda")
    return p


def shapes(args) -> dict[str, tuple[int, int]]:
    """(N, K) of each fused weight of the decode step."""
    h, i = args.hidden, args.intermediate
    return {"qkv": (3 * h, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (args.vocab, h)}


def one_shape(n: int, k: int, rows: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """cuBLAS vs the Triton GEMV on copies of one (N, K) weight (>= 256 MB in all, past the L2 cache)."""
    from common.models import gemv

    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, -(-(256 << 20) // nbytes)) if device.type == "cuda" else 2
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, k, device=device, dtype=dtype)
    gemv.gemv(x, ws[0])  # choose the tile before any capture
    out: dict[str, Any] = {"copies": copies}
    for name, fn in (("cublas", F.linear), ("triton", gemv.gemv)):
        ms = graph_ms(lambda fn=fn: [fn(x, w) for w in ws], device, repeats) / copies
        out[f"{name}_ms"], out[f"{name}_gbps"] = ms, nbytes / ms / 1e6
    out["triton_per_config_ms"] = {
        f"n{c.block_n}_k{c.block_k}_w{c.warps}_p{c.programs_per_sm}":
            gemv.time_config(x, ws[0], c) if device.type == "cuda" else time_ms(lambda c=c: gemv.gemv(x, ws[0], c),
                                                                                  device, 1)
        for c in gemv.CONFIGS}
    ref = F.linear(x.float(), ws[0].float())
    out["triton_rel_err"] = float((gemv.gemv(x, ws[0]).float() - ref).abs().max() / ref.abs().max())
    return out


def gemv_section(args, device: torch.device, rows_list: list[int]) -> dict[str, Any]:
    """Per shape and row count, cuBLAS vs the Triton GEMV; then a whole step's weights as one graph of each."""
    from common.models import gemv

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict[str, Any] = {}
    for name, (n, k) in shapes(args).items():
        for rows in rows_list:
            out[f"{name}_{n}x{k}_rows_{rows}"] = one_shape(n, k, rows, device, dtype, args.repeats)
            torch.cuda.empty_cache() if device.type == "cuda" else None
    sizes = [s for name, s in shapes(args).items() if name != "lm_head"] * args.layers + [shapes(args)["lm_head"]]
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for n, k in sizes]
    nbytes = sum(w.numel() for w in weights) * torch.finfo(dtype).bits // 8
    floor: dict[str, Any] = {"gigabytes": nbytes / 1e9}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, device=device, dtype=dtype) for k in {w.shape[1] for w in weights}}
        for w in {tuple(w.shape): w for w in weights}.values():
            gemv.gemv(xs[w.shape[1]], w)  # tiles chosen before capture
        for name, fn in (("cublas", F.linear), ("triton", gemv.gemv)):
            ms = graph_ms(lambda fn=fn, xs=xs: [fn(xs[w.shape[1]], w) for w in weights], device, args.repeats)
            floor[f"{name}_rows_{rows}_ms"], floor[f"{name}_rows_{rows}_tbps"] = ms, nbytes / ms / 1e9
    out["gemv_floor"] = floor
    out["chosen_tiles"] = gemv.chosen_configs()
    return out


def step_replays(runner, args, device: torch.device, rows_list: list[int]) -> dict[str, float]:
    """Graph replay ms of the runner's step at each row count over a cache of ``--context`` live positions."""
    dtype = runner.lm_head.weight.dtype if device.type == "cuda" else torch.float32
    cache = runner.new_cache(args.context + 64, dtype, device)
    cache.length = args.context
    if device.type == "cuda":
        graphs = CudaGraphDecoder(runner, cache, rows_list)
        out = {f"replay_ms_{r}": graphs.replay_ms(r, args.repeats) for r in rows_list}
    else:  # tests: the eager static step, wall clock
        out = {f"replay_ms_{r}": time_ms(lambda r=r: runner.static_step(
            torch.randn(1, r, args.hidden), torch.arange(args.context, args.context + r), cache), device, 1)
            for r in rows_list}
    out["verify_over_decode"] = out[f"replay_ms_{rows_list[-1]}"] / out[f"replay_ms_{rows_list[0]}"]
    return out


def step_section(runner, args, device: torch.device, rows_list: list[int]) -> dict[str, Any]:
    """The bf16 fused step as graphs, ``gemv="cublas"`` vs ``"triton"``, and the logits' agreement."""
    if not runner.use_kernels(True):
        return {"skipped": "the Triton decode kernels cannot run here"}
    out: dict[str, Any] = {}
    for kind in ("cublas", "triton"):
        runner.use_gemv(kind)
        out[kind] = step_replays(runner, args, device, rows_list)
    runner.use_gemv("cublas")
    return out


def quantize_nf4(runner) -> None:
    """Replace every projection of the runner's layers by a bitsandbytes nf4 ``Linear4bit`` (double-quantized)."""
    from benchmark_inference.nf4_profile import nf4_module

    for layer in runner.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, nf4_module(getattr(parent, name).weight))


def eager_breakdown(runner, args, device: torch.device, rows: int) -> dict[str, Any]:
    """Device ms per op class of one eager fused step of ``rows`` rows (torch.profiler)."""
    dtype = runner.lm_head.weight.dtype if device.type == "cuda" else torch.float32
    cache = runner.new_cache(args.context + 64, dtype, device)
    cache.length = args.context
    embeds = torch.randn(1, rows, args.hidden, device=device, dtype=dtype)
    positions = torch.arange(args.context, args.context + rows, device=device)
    return breakdown(lambda: runner.static_step(embeds, positions, cache), device, NF4_CLASSES)


def nf4_section(runner, args, device: torch.device, rows_list: list[int]) -> dict[str, Any]:
    """The nf4 decoder: eager breakdowns per multi-row path, then graph replays and verify/decode of each."""
    quantize_nf4(runner)
    runner = type(runner)(runner.language_model, runner.lm_head)  # fresh state over the quantized layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runner.use_kernels(True)
    from common.models import nf4_kernels

    paths = {"bnb": dict(on=False), "nf4_triton": dict(on=True), "nf4_triton_tc": dict(on=True, mode="triton_tc"),
             "dequant_cublas": dict(on=True, mode="dequant"), "dequant_triton_gemv": dict(on=True, mode="dequant")}
    out: dict[str, Any] = {"tc_table": {",".join(map(str, k)): repr(v) for k, v in nf4_kernels.TC_TABLE.items()}}
    for name, opts in paths.items():
        row: dict[str, Any] = {"on": runner.use_nf4_kernel(**opts)}
        runner.use_gemv("triton" if name == "dequant_triton_gemv" else "cublas")
        try:
            with torch.no_grad():
                row.update({f"eager_rows_{r}": eager_breakdown(runner, args, device, r) for r in rows_list})
                replays = step_replays(runner, args, device, rows_list)
            row.update(replays, verify_over_decode_4bit=replays["verify_over_decode"])
        except Exception as exc:  # report, keep measuring the other paths
            row["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[name] = row
    runner.use_gemv("cublas")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    rows_list = [int(r) for r in args.rows.split(",")]
    device = torch.device(args.device)
    report = ProfileReport(args.json, device, layers=args.layers, context=args.context)
    save = report.save

    with torch.no_grad():
        if "gemv" in sections:
            save("gemv", lambda: gemv_section(args, device, rows_list))
            torch.cuda.empty_cache() if device.type == "cuda" else None
        if "nf4_floor" in sections:  # before nf4_step, which then uses the tuned nf4_triton_tc table
            from benchmark_inference.nf4_profile import nf4_floor_section

            save("nf4_floor", lambda: nf4_floor_section(args, device, rows_list))
            torch.cuda.empty_cache() if device.type == "cuda" else None
        if "step" in sections or "nf4_step" in sections:
            runner = build_runner(args)
            if "step" in sections:
                save("step", lambda: step_section(runner, args, device, rows_list))
            if "nf4_step" in sections:
                save("nf4_step", lambda: nf4_section(runner, args, device, rows_list))
    return report.data


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
