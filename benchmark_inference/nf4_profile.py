"""The nf4 matmuls of one decode/verify step alone: bitsandbytes vs the Triton nf4 kernels, ms and GB/s.

The ``nf4_floor`` section of ``python -m benchmark_inference.gemv_profile --sections nf4_floor``:
every projection of a LLaMA-7B-shaped decoder (``--layers`` x q, k, v, o, gate, up, down) as a
double-quantized bitsandbytes nf4 weight with random values. Per weight shape and row count, each
``nf4_kernels.TC_CANDIDATES`` tile of the tensor-core kernel is timed as one CUDA graph over that
shape's weights (past the L2 cache), beside bitsandbytes and the first Triton kernel; the fastest
tile per (rows class, shape) goes into ``nf4_kernels.TC_TABLE`` (printed as ``tc_table``, to paste).
Then all the step's nf4 matmuls as one graph per path and row count: bitsandbytes, ``nf4_triton``,
``nf4_triton_tc`` with the shipped table and ``nf4_triton_tc_tuned`` with the tuned one.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmark_inference.prefill_profile import graph_ms


def nf4_module(dense: torch.Tensor) -> torch.nn.Module:
    """A bias-free, double-quantized bitsandbytes nf4 ``Linear4bit`` of ``dense`` (N, K), on its device."""
    import bitsandbytes as bnb

    n, k = dense.shape
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dense.dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
    return q.to(dense.device)


def _nbytes(w) -> int:
    """Bytes one matmul reads of an ``Nf4Weight``: packed codes and absmax (nested statistics are tiny)."""
    return w.packed.numel() + w.absmax.numel() * w.absmax.element_size()


def _paths(nk) -> dict[str, Any]:
    """name -> fn(module, weight, x) of the whole-step paths."""
    return {"bnb": lambda m, w, x: m(x), "nf4_triton": lambda m, w, x: nk.nf4_linear(x, w),
            "nf4_triton_tc": lambda m, w, x: nk.nf4_linear_tc(x, w)}


def tune_shape(group: list, x: torch.Tensor, device: torch.device, repeats: int, candidates) -> dict[str, Any]:
    """Per call ms and GB/s of bitsandbytes, ``nf4_triton`` and each candidate tile over ``group``'s weights."""
    from common.models import nf4_kernels as nk

    nbytes = _nbytes(group[0][1])
    out: dict[str, Any] = {"copies": len(group)}
    nk.nf4_linear(x, group[0][1])  # the first kernel's own tile choice, before any capture
    fns = {name: fn for name, fn in _paths(nk).items() if name != "nf4_triton_tc"}
    fns.update({f"tc:{c}": (lambda m, w, x, c=c: nk.nf4_linear_tc(x, w, c)) for c in candidates})
    best, best_ms = None, float("inf")
    for name, fn in fns.items():
        try:
            ms = graph_ms(lambda fn=fn: [fn(m, w, x) for m, w in group], device, repeats) / len(group)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile here: report, try the rest
            out[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        out[name] = {"ms": ms, "gbps": nbytes / ms / 1e6}
        if name.startswith("tc:") and ms < best_ms:
            best, best_ms = name[3:], ms
    out["best_tc"] = best
    if best is not None:  # the winner's result against bitsandbytes' own dequantized weight (rounded to x's dtype)
        import bitsandbytes as bnb

        m, w = group[0]
        dense = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(x.dtype).float()
        ref = x.float() @ dense.T
        cfg = next(c for c in candidates if str(c) == best)
        out["best_tc_rel_err"] = float((nk.nf4_linear_tc(x, w, cfg).float() - ref).norm() / ref.norm())
    return out


def nf4_floor_section(args, device: torch.device, rows_list: list[int]) -> dict[str, Any]:
    """Tiles timed per shape and row count, the table tuned, then every nf4 matmul of a step per path."""
    from common.models import nf4_kernels as nk

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, i = args.hidden, args.intermediate
    layer_shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    modules = [nf4_module(torch.randn(n, k, device=device, dtype=dtype) * 0.02)
               for _ in range(args.layers) for n, k in layer_shapes]
    weights = [nk.nf4_weight(m) for m in modules]
    nbytes = sum(_nbytes(w) for w in weights)
    out: dict[str, Any] = {"gigabytes": nbytes / 1e9, "matmuls": len(weights), "shipped_table": _table(nk)}
    xs = {r: {k: torch.randn(r, k, device=device, dtype=dtype) for k in (h, i)} for r in rows_list}
    candidates = nk.TC_CANDIDATES if cuda else nk.TC_CANDIDATES[:1]
    tuned: dict[tuple[int, int, int], Any] = {}
    for n, k in sorted(set(layer_shapes)):
        group = [(m, w) for m, w in zip(modules, weights) if (w.out_features, w.in_features) == (n, k)]
        for r in rows_list:
            tiles = candidates if r > 1 or len(rows_list) == 1 else ()  # the 1-row step stays on bitsandbytes
            res = tune_shape(group if cuda else group[:1], xs[r][k], device, args.repeats, tiles)
            out[f"{n}x{k}_rows_{r}"] = res
            if res["best_tc"]:
                tuned.setdefault((nk.rows_class(r), n, k), next(c for c in candidates if str(c) == res["best_tc"]))
    fns = _paths(nk)
    for r in rows_list:
        for name, fn in fns.items():
            out[f"{name}_rows_{r}_ms"] = graph_ms(
                lambda fn=fn, r=r: [fn(m, w, xs[r][w.in_features]) for m, w in zip(modules, weights)],
                device, args.repeats)
    nk.set_tc_configs(tuned)  # the tuned table: nf4_triton_tc_tuned here, and the nf4_step section after this one
    out["tc_table"] = _table(nk)
    for r in rows_list:
        out[f"nf4_triton_tc_tuned_rows_{r}_ms"] = graph_ms(
            lambda r=r: [nk.nf4_linear_tc(xs[r][w.in_features], w) for w in weights], device, args.repeats)
    for key in [k for k in out if k.endswith("_ms") and k.count("_rows_")]:
        out[key.replace("_ms", "_gbps")] = nbytes / out[key] / 1e6
    out["summary"] = _summary(out, rows_list)
    return out


def _table(nk) -> dict[str, str]:
    """``TC_TABLE`` as text: "rows_class,N,K" -> the config's repr (paste into nf4_kernels.TC_TABLE)."""
    return {",".join(map(str, key)): repr(cfg) for key, cfg in sorted(nk.TC_TABLE.items())}


def _summary(out: dict[str, Any], rows_list: list[int]) -> dict[str, float]:
    """Verify-rows matmuls over the 1-row bitsandbytes matmuls (the step's 4-bit goal: <= 1.3 for the whole step)."""
    one, many = rows_list[0], rows_list[-1]
    base = out[f"bnb_rows_{one}_ms"]
    return {f"{name}_rows_{many}_over_bnb_rows_{one}": out[f"{name}_rows_{many}_ms"] / base
            for name in ("bnb", "nf4_triton", "nf4_triton_tc", "nf4_triton_tc_tuned")}
