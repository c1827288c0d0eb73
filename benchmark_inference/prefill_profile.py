"""Where the 2069-token Video-LLaVA-7B prefill spends its time, and what each fix buys (issue 15, item 6).

    python -m benchmark_inference.prefill_profile --json $OUT/prefill.json [--tokens 2069 --layers 32]

Builds a LLaMA-7B-shaped decoder with random bf16 weights on the GPU (no checkpoint) and, in one run:
- times the prefill (CUDA events, median) along the ladder of fixes: the old eager path (separate
  q/k/v and gate/up GEMMs, transformers' float32 RMSNorm, unfused rotary and SiLU), fused GEMMs,
  then the Triton kernels (the new default), and the kernels with cuDNN attention instead of flash;
- breaks each down per op class (GEMM, attention, Triton, copies, other element-wise) with
  ``torch.profiler``;
- times the GEMMs alone at M = 2048 / 2069 / 2176 rows (tile quantization), the causal attention
  alone, the LM head over all rows vs the last one, and the twin's masked prefix (masked SDPA vs
  two causal blocks);
- checks the new path against the eager reference (logit error, same argmax);
- with bitsandbytes importable: nf4 layers at 7B shapes, bitsandbytes' 1-row and 6-row matmuls vs the
  Triton nf4 kernel (``common.models.nf4_kernels``), and the kernel's error against the dequantized weight.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from typing import Any

import torch
from torch.nn import functional as F

from benchmark_inference.profile_report import ProfileReport
from common.models.decoder import capture_graph, graph_replay_ms

CLASSES = (("attention", r"flash|fmha|attention|cudnn|sdpa"),
           ("triton", r"triton|add_rms_norm|rope_kv|silu_mul|_nf4_|_sum_parts"),
           ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|wgmma"),
           ("copy", r"copy|cat|index|fill|memset|memcpy"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_inference.prefill_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where the results JSON goes")
    p.add_argument("--tokens", type=int, default=2069, help="prompt length (default 2069, Video-LLaVA's)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--masked_prefix", type=int, default=2000, help="the twin's hidden visual padding for its row")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no_4bit", action="store_true", help="skip the bitsandbytes nf4 part")
    return p


def build_runner(args, masked_prefix: int = 0):
    """A random-weight LLaMA decoder + LM head behind ``LlamaRunner`` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    from common.models.decoder import LlamaRunner

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaModel(cfg).eval()
            head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    finally:
        torch.set_default_dtype(previous)
    return LlamaRunner(model, head, masked_prefix=masked_prefix)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_ms(calls, device: torch.device, repeats: int) -> float:
    """GPU ms of one replay of a CUDA graph of ``calls()`` (warmed up, and tiles chosen, outside the capture).

    On the CPU (tests): the median wall-clock ms of ``calls()``.
    """
    if device.type != "cuda":
        return time_ms(calls, device, repeats)
    graph, _ = capture_graph(calls, device, warmup=2)
    return graph_replay_ms(graph, device, repeats)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median ms of ``fn()`` (CUDA events on CUDA, wall clock on CPU) after two untimed calls."""
    import time

    fn(), fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def classify(name: str, classes: tuple[tuple[str, str], ...] = CLASSES) -> str:
    """The op class of a GPU kernel's name (the first of ``classes`` whose pattern matches)."""
    for cls, pattern in classes:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return "elementwise"


def breakdown(fn, device: torch.device, classes: tuple[tuple[str, str], ...] = CLASSES) -> dict[str, Any]:
    """Device ms per op class (of ``classes``) and the ten longest kernels of one ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    per_class: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0) or 0.0
        if not us or ev.key.startswith(("aten::", "cuda", "Memcpy", "Memset", "ProfilerStep")):
            continue
        cls = classify(ev.key, classes)
        per_class[cls] = per_class.get(cls, 0.0) + us / 1000
        kernels.append((us / 1000, ev.count, ev.key[:120]))
    kernels.sort(reverse=True)
    return {"ms_per_class": {k: round(v, 3) for k, v in sorted(per_class.items())},
            "top_kernels": [{"ms": round(ms, 3), "calls": n, "name": k} for ms, n, k in kernels[:10]]}


def prefill_fn(runner, x: torch.Tensor):
    """One fresh prefill of x (1, T, H) through ``runner.run`` (LM head on the last row, as ``vlm.prefill``)."""
    def fn():
        cache = runner.new_cache(x.shape[1] + 128, x.dtype, x.device)
        return runner.run(x, cache, all_logits=False)[0]
    return fn


def ladder(runner, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """The prefill along the fixes, each timed, broken down, and checked against the eager reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, out = x.device, {}
    fn = prefill_fn(runner, x)
    with torch.no_grad():
        reference = fn().float()
        steps = [("eager_unfused", None), ("eager_fused", runner.fuse_projections),
                 ("kernels", lambda: runner.use_prefill_kernels(True))]
        for name, switch in steps:
            if switch is not None and not switch():
                out[name] = {"skipped": "not available here"}
                continue
            logits = fn().float()
            out[name] = {"ms": time_ms(fn, device, repeats), **breakdown(fn, device),
                         "max_abs_logit_diff_vs_eager": float((logits - reference).abs().max()),
                         "argmax_equal": bool(logits.argmax() == reference.argmax())}
        if "ms" in out["kernels"]:
            for name, backend in (("kernels_cudnn_attention", SDPBackend.CUDNN_ATTENTION),
                                  ("kernels_flash_attention", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        out[name] = {"ms": time_ms(fn, device, repeats)}
                except RuntimeError as exc:  # that backend cannot run these shapes here
                    out[name] = {"failed": str(exc)[:160]}
    return out


def gemm_parts(args, device: torch.device, repeats: int) -> dict[str, Any]:
    """The decoder's GEMMs alone (fused q/k/v, o, fused gate/up, down) x layers, at M around the prompt."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, i = args.hidden, args.intermediate
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
               for n, k in ((3 * h, h), (h, h), (2 * i, h), (h, i))]
    out: dict[str, Any] = {}
    for m in sorted({2048, args.tokens, 2176}):
        xs = {w.shape[1]: torch.randn(m, w.shape[1], device=device, dtype=dtype) for w in weights}
        ms = time_ms(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in weights], device, repeats)
        flops = 2 * m * sum(w.numel() for w in weights)
        out[f"rows_{m}"] = {"ms_all_layers": ms * args.layers, "tflops": flops / ms / 1e9}
    return out


def attention_alone(args, device: torch.device, repeats: int) -> dict[str, float]:
    """Causal SDPA over the prompt x layers; and the twin's masked prefix: one masked call vs two causal ones."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t, nh, hd = args.tokens, args.heads, args.hidden // args.heads
    q, k, v = (torch.randn(1, nh, t, hd, device=device, dtype=dtype) for _ in range(3))
    p = min(args.masked_prefix, t - 1)
    pos = torch.arange(t, device=device)
    mask = (pos[None, :] <= pos[:, None]) & ((pos[None, :] >= p) | (pos[:, None] < p))

    def two_blocks():
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
                          for a, b in ((0, p), (p, t))], dim=2)

    return {"causal_ms_all_layers": args.layers * time_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, repeats),
            "masked_prefix_mask_ms_all_layers": args.layers * time_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, repeats),
            "masked_prefix_two_causal_ms_all_layers": args.layers * time_ms(two_blocks, device, repeats)}


def lm_head_rows(runner, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """The LM head over every prompt row vs the last row only (what ``vlm.prefill`` runs)."""
    h = x[0]
    return {"all_rows_ms": time_ms(lambda: runner.lm_head(h), x.device, repeats),
            "last_row_ms": time_ms(lambda: runner.lm_head(h[-1:]), x.device, repeats)}


def masked_prefix_prefill(args, repeats: int) -> dict[str, Any]:
    """The widened twin's prefill (a masked visual prefix): eager masked SDPA vs the kernels' two causal blocks."""
    runner = build_runner(args, masked_prefix=args.masked_prefix)
    x = torch.randn(1, args.tokens, args.hidden, device=args.device,
                    dtype=runner.lm_head.weight.dtype)
    fn = prefill_fn(runner, x)
    with torch.no_grad():
        reference = fn().float()
        runner.fuse_projections()
        out = {"eager_fused_ms": time_ms(fn, x.device, repeats)}
        if runner.use_prefill_kernels(True):
            logits = fn().float()
            out.update(kernels_ms=time_ms(fn, x.device, repeats),
                       max_abs_logit_diff_vs_eager=float((logits - reference).abs().max()),
                       argmax_equal=bool(logits.argmax() == reference.argmax()))
    return out


def nf4_part(args, device: torch.device, repeats: int) -> dict[str, Any]:
    """bitsandbytes nf4 layers at 7B shapes: its 1-row and 6-row matmuls vs the Triton kernel (CUDA only)."""
    import bitsandbytes as bnb

    from common.models import nf4_kernels

    out: dict[str, Any] = {"bitsandbytes": bnb.__version__}
    h, i = args.hidden, args.intermediate
    for name, (n, k) in {"q_proj": (h, h), "gate_proj": (i, h), "down_proj": (h, i)}.items():
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        layer = layer.to(device)
        weight = nf4_kernels.nf4_weight(layer)
        dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        row = {}
        for m in (1, 6):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            row[f"bnb_rows_{m}_ms"] = time_ms(lambda x=x, layer=layer: layer(x), device, repeats)
            row[f"triton_rows_{m}_ms"] = time_ms(lambda x=x, w=weight: nf4_kernels.nf4_linear(x, w), device, repeats)
            ref = (x.float() @ dense.float().T)
            row[f"triton_rows_{m}_rel_err"] = float((nf4_kernels.nf4_linear(x, weight).float() - ref).abs().max()
                                                    / ref.abs().max())
        row["dense_bf16_rows_6_ms"] = time_ms(lambda x=x, d=dense: F.linear(x, d), device, repeats)
        row["triton_rows_6_ms_per_config"] = {
            f"n{c.block_n}_sub{c.sub}_w{c.warps}_p{c.programs_per_sm}": time_ms(
                lambda x=x, c=c, w=weight: nf4_kernels.nf4_linear(x, w, c), device, repeats)
            for c in nf4_kernels.CONFIGS}
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    report = ProfileReport(args.json, device, tokens=args.tokens, layers=args.layers)
    save = report.save

    runner = build_runner(args)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=runner.lm_head.weight.dtype)
    with torch.no_grad():
        save("prefill", lambda: ladder(runner, x, args.repeats))
        save("lm_head", lambda: lm_head_rows(runner, x, args.repeats))
        save("gemm_only", lambda: gemm_parts(args, device, args.repeats))
        save("attention_only", lambda: attention_alone(args, device, args.repeats))
    runner = x = None  # free the model before the twin's
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.no_grad():
        save("masked_prefix", lambda: masked_prefix_prefill(args, args.repeats))
        if not args.no_4bit and device.type == "cuda":
            save("nf4", lambda: nf4_part(args, device, args.repeats))
    return report.data


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
