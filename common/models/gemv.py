"""A Triton GEMV for the decode/verify linears: 1..16 rows times a dense weight [N, K] (nn.Linear's layout).

Imported only by ``LlamaRunner.use_gemv("triton")``, the GPU profile and tests, and only where Triton
runs (CUDA, or its CPU interpreter). A decode step is weight streaming: each program reads a tile of
``block_n`` consecutive weight rows, ``block_k`` columns at a time (contiguous, wide loads), over its
share of K, and multiplies it with every input row kept in registers (fp32 accumulation). K is split
so that enough programs fill every SM several times; the parts are summed in a fixed order by a
second pass, so results are deterministic. One row uses an element-wise multiply-add, several rows
``tl.dot`` (16 padded rows: tensor cores are idle in a GEMV anyway). The tile is chosen once per
shape by timing (never while a CUDA graph is captured), as ``nf4_kernels`` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # BLOCK_M of the multi-row kernel


@triton.jit
def _gemv_tile(acc, x_ptr, w_ptr, k0, cols, nmask, rows, rmask, K, stride_xm, stride_wn, DOT: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + this K slice's products: (BLOCK_M, BLOCK_N) with DOT, else (BLOCK_N, BLOCK_K) for one row."""
    kk = k0 + tl.arange(0, BLOCK_K)
    kmask = kk < K
    w = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                other=0.0, eviction_policy="evict_first")
    if DOT:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    else:
        x = tl.load(x_ptr + kk, mask=kmask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, ITERS,
                 SPLIT: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, FOR_LOOP: tl.constexpr):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    first = sp * ITERS
    if FOR_LOOP:  # compiled: a for loop over a runtime count (software-pipelined loads)
        for i in range(ITERS):
            acc = _gemv_tile(acc, x_ptr, w_ptr, (first + i) * BLOCK_K, cols, nmask, rows, rmask, K, stride_xm,
                             stride_wn, DOT, BLOCK_K, PRECISION)
    else:  # Triton's CPU interpreter cannot range() over a runtime count
        i = first
        while i < first + ITERS:
            acc = _gemv_tile(acc, x_ptr, w_ptr, i * BLOCK_K, cols, nmask, rows, rmask, K, stride_xm, stride_wn,
                             DOT, BLOCK_K, PRECISION)
            i += 1
    if DOT:
        res = acc
    else:
        res = tl.sum(acc, axis=1)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(out_ptr + sp * M * N + offs, res, mask=omask)
    else:
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=omask)


# out = the sum of N_PARTS fp32 split-K partial results, in a fixed order (shared with nf4_kernels)
@triton.jit
def sum_parts_kernel(part_ptr, out_ptr, total, N_PARTS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(N_PARTS):  # a fixed order: the same bits every run
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@dataclass(frozen=True)
class GemvConfig:
    """Tile of one program: ``block_n`` weight rows x ``block_k`` columns per iteration; K split to fill SMs."""

    block_n: int = 16
    block_k: int = 256
    warps: int = 4
    programs_per_sm: int = 4  # 0: no split of K


# (few: each compiles) tried once per (shape, rows class) on CUDA, the fastest kept; the CPU interpreter uses the first
CONFIGS = (GemvConfig(16, 256, 4, 4), GemvConfig(32, 256, 4, 4), GemvConfig(16, 512, 4, 4),
           GemvConfig(64, 128, 4, 4), GemvConfig(32, 256, 8, 2), GemvConfig(64, 256, 8, 0))
_chosen: dict[tuple, GemvConfig] = {}


def split_k(steps: int, n: int, block_n: int, programs_per_sm: int, device: torch.device) -> tuple[int, int]:
    """(splits of K, iterations per split) for ``steps`` K iterations over ``n`` outputs in ``block_n`` tiles:
    about ``programs_per_sm`` programs per SM (0: no split)."""
    if device.type != "cuda":
        splits = min(steps, 1 + programs_per_sm % 3)  # the interpreter: 1 or 2 parts, both paths exercised
    elif programs_per_sm == 0:
        splits = 1
    else:
        splits = max(1, min(steps, triton.cdiv(programs_per_sm * sm_count(device), triton.cdiv(n, block_n))))
    iters = triton.cdiv(steps, splits)
    return triton.cdiv(steps, iters), iters


def _splits(k: int, n: int, cfg: GemvConfig, device: torch.device) -> tuple[int, int]:
    """(splits of K, iterations per split) for this config."""
    return split_k(triton.cdiv(k, cfg.block_k), n, cfg.block_n, cfg.programs_per_sm, device)


def _launch(x2: torch.Tensor, weight: torch.Tensor, cfg: GemvConfig, out: torch.Tensor) -> None:
    rows, k = x2.shape
    n = weight.shape[0]
    splits, iters = _splits(k, n, cfg, x2.device)
    dot = rows > 1
    target = torch.empty((splits, rows, n), dtype=torch.float32, device=x2.device) if splits > 1 else out
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        x2, weight, target, rows, n, k, x2.stride(0), weight.stride(0), ITERS=iters, SPLIT=splits > 1, DOT=dot,
        BLOCK_M=MAX_ROWS if dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        FOR_LOOP=x2.device.type == "cuda", num_warps=cfg.warps)
    if splits > 1:
        block = 1024
        sum_parts_kernel[(triton.cdiv(rows * n, block),)](target, out, rows * n, N_PARTS=splits, BLOCK=block,
                                                           num_warps=4)


def _config(x2: torch.Tensor, weight: torch.Tensor) -> GemvConfig:
    """The fastest of ``CONFIGS`` for this shape and row class (timed once, never during a graph capture)."""
    key = (tuple(weight.shape), x2.shape[0] > 1, x2.dtype, x2.device)
    if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _chosen.get(key, CONFIGS[0])
    if key not in _chosen:
        _chosen[key] = min(CONFIGS, key=lambda cfg: time_config(x2, weight, cfg))
    return _chosen[key]


@functools.cache
def _l2_flush(device: torch.device) -> torch.Tensor:
    return torch.empty(64 << 20, dtype=torch.int32, device=device)  # 256 MB, past any L2 cache


def time_config(x2: torch.Tensor, weight: torch.Tensor, cfg: GemvConfig, repeats: int = 5) -> float:
    """GPU ms of one call with this tile, the weight streamed from memory (L2 flushed before each call; CUDA only)."""
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
    _launch(x2, weight, cfg, out)  # compile and warm
    total = 0.0
    for _ in range(repeats):
        _l2_flush(x2.device).zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _launch(x2, weight, cfg, out)
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
    return total / repeats


def chosen_configs() -> dict[str, str]:
    """The tile picked per (N x K, multi-row) so far, for reports."""
    return {f"{k[0][0]}x{k[0][1]}_{'rows' if k[1] else 'row'}": str(v) for k, v in _chosen.items()}


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` for x (..., K) of at most ``MAX_ROWS`` rows and weight (N, K); (..., N) in x's dtype.

    ``config`` fixes the tile; by default the fastest of ``CONFIGS`` for the shape.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, k = x2.shape
    if rows > MAX_ROWS or weight.dim() != 2 or k != weight.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv takes up to {MAX_ROWS} rows of a row-major weight's {weight.shape[-1]} columns, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    out = torch.empty((rows, weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x2, weight, config or _config(x2, weight), out)
    return out.reshape(*lead, weight.shape[0])
