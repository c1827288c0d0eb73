"""A Triton matmul of a few rows by a bitsandbytes nf4 weight, reading the packed weight once.

Imported only by ``LlamaRunner.use_nf4_kernel`` and only where Triton runs (CUDA, or its CPU
interpreter in tests). bitsandbytes' one-row GEMV is fast, but for 2..16 rows (a verify step of
gamma + 1 tokens) it dequantizes the whole weight to bf16 and runs a GEMM, or takes a custom kernel
that its own dispatch rates below that on Hopper: a 6-row step then costs 2.3-2.5x a 1-row step.
Here each program dequantizes its weight tile in registers (nf4 code x absmax, double-quantized
absmax decoded in the kernel too) and multiplies it with every row (split-K, fixed-order sum of the
parts, so results are deterministic). The dequantized weight rounds to the activations' dtype as
bitsandbytes' dequantize does, so the result equals ``x @ dequantize_4bit(W).T`` up to summation order.

``nf4_linear_tc`` (``use_nf4_kernel(mode="triton_tc")``) keeps that contract with less work per element:
one quantization block per ``tl.dot`` step, so the (double-quantized) absmax is decoded once per block and
row rather than gathered per element, x is read with wide loads, and the tile comes from a fixed table per
(rows class, N, K) (``TC_TABLE``; ``benchmark_inference.nf4_profile`` times the candidates on a GPU).
Split-K parts are summed in a fixed order by a second kernel or, ``serial``, by the last program of each
column tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.models.gemv import sm_count, split_k, sum_parts_kernel

MAX_ROWS = 16  # BLOCK_M of the kernel: rows of one call


@dataclass
class Nf4Weight:
    """The tensors of one bitsandbytes nf4 ``Linear4bit`` the kernel reads (views, nothing copied)."""

    packed: torch.Tensor  # uint8 (N * K / 2,): two codes a byte, the even element in the high nibble
    absmax: torch.Tensor  # float32 (N * K / blocksize,), or uint8 when double-quantized (nested)
    code: torch.Tensor  # float32 (16,): the nf4 values
    out_features: int
    in_features: int
    blocksize: int
    nested_absmax: torch.Tensor | None = None  # float32 (blocks / nested_blocksize,)
    nested_code: torch.Tensor | None = None  # float32 (256,)
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None  # float32 (1,)
    # int32 zeros, one per column tile (of >= 16 rows): the tc kernel's split-K arrival counters, each
    # reset by the program that sums its tile. Per weight, so calls on other weights never share one.
    locks: torch.Tensor | None = None


def nf4_weight(module: torch.nn.Module) -> Nf4Weight | None:
    """The kernel's view of a bias-free bitsandbytes nf4 linear layer; None for anything else."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(module, "bias", None) is not None or state.quant_type != "nf4":
        return None
    if len(state.shape) != 2 or getattr(state, "packing_format_for_cpu", False):
        return None
    out_features, in_features = (int(v) for v in state.shape)
    if state.blocksize < 32 or in_features % state.blocksize or state.code.numel() != 16:
        return None
    w = Nf4Weight(packed=weight.data.reshape(-1), absmax=state.absmax.reshape(-1), code=state.code.float(),
                  out_features=out_features, in_features=in_features, blocksize=int(state.blocksize))
    if state.nested:
        w.nested_absmax = state.state2.absmax.reshape(-1).float()
        w.nested_code = state.state2.code.float()
        w.nested_blocksize = int(state.state2.blocksize)
        w.offset = torch.as_tensor(state.offset, dtype=torch.float32, device=w.absmax.device).reshape(1)
    w.locks = torch.zeros(-(-out_features // 16), dtype=torch.int32, device=w.absmax.device)
    return w


@triton.jit
def _nf4_splitk_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, part_ptr,
                       M, N, K, stride_xm, ITERS: tl.constexpr,
                       NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, SUB: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    HALF: tl.constexpr = BS // 2
    W: tl.constexpr = SUB * HALF  # bytes of one weight row read per iteration (SUB quantization blocks)
    j = tl.arange(0, W)
    sub = tl.arange(0, SUB)
    nblk = K // BS  # blocks per weight row
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(ITERS):
        b = (sp * ITERS + i) * SUB  # first quantization block of this iteration
        if b < nblk:
            g = cols[:, None] * nblk + b + sub[None, :]  # (BLOCK_N, SUB) global block indices
            gmask = nmask[:, None] & (b + sub[None, :] < nblk)
            if NESTED:
                a8 = tl.load(absmax_ptr + g, mask=gmask, other=0).to(tl.int32)
                scale = tl.load(abs2_ptr + g // BS2, mask=gmask, other=0.0)
                am = tl.load(code2_ptr + a8) * scale + tl.load(offset_ptr)
            else:
                am = tl.load(absmax_ptr + g, mask=gmask, other=0.0)
            am = tl.reshape(tl.broadcast_to(am[:, :, None], (BLOCK_N, SUB, HALF)), (BLOCK_N, W))
            jmask = b * HALF + j < nblk * HALF
            byte = tl.load(w_ptr + (cols[:, None] * nblk + b) * HALF + j[None, :],
                           mask=nmask[:, None] & jmask[None, :], other=0).to(tl.int32)
            kk = b * BS + 2 * j
            xmask = rmask[:, None] & jmask[None, :]
            xe = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=xmask, other=0.0)
            xo = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] + 1, mask=xmask, other=0.0)
            hi = (tl.load(code_ptr + (byte >> 4)) * am).to(xe.dtype)
            lo = (tl.load(code_ptr + (byte & 15)) * am).to(xe.dtype)
            acc += tl.dot(xe, tl.trans(hi), input_precision=PRECISION)
            acc += tl.dot(xo, tl.trans(lo), input_precision=PRECISION)
    tl.store(part_ptr + (sp * M + rows[:, None]) * N + cols[None, :], acc, mask=rmask[:, None] & nmask[None, :])


@dataclass(frozen=True)
class Nf4Config:
    """Tile of one program: ``block_n`` output features x ``sub`` quantization blocks per iteration."""

    block_n: int = 64
    sub: int = 1
    warps: int = 4
    programs_per_sm: int = 4


# tried once per weight shape on CUDA (the fastest is kept); the CPU interpreter uses the first
CONFIGS = (Nf4Config(64, 1, 4), Nf4Config(32, 2, 4), Nf4Config(64, 2, 8), Nf4Config(32, 4, 8),
           Nf4Config(128, 1, 8), Nf4Config(16, 4, 4, 8))
_chosen: dict[tuple, Nf4Config] = {}


def _launch(x2: torch.Tensor, w: Nf4Weight, cfg: Nf4Config, out: torch.Tensor) -> None:
    rows, k = x2.shape
    n, nblk = w.out_features, k // w.blocksize
    col_programs = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(nblk, cfg.sub)  # iterations of the whole K
    splits = max(1, min(steps, triton.cdiv(cfg.programs_per_sm * sm_count(x2.device), col_programs)))
    if x2.device.type != "cuda":
        splits = min(steps, 2)  # the interpreter: two parts, so the sum of parts is exercised
    iters = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, iters)
    parts = torch.empty((splits, rows, n), dtype=torch.float32, device=x2.device)
    nested = w.nested_absmax is not None
    dummy = w.code
    _nf4_splitk_kernel[(col_programs, splits)](
        x2, w.packed, w.absmax, w.code, w.nested_absmax if nested else dummy,
        w.nested_code if nested else dummy, w.offset if nested else dummy, parts,
        rows, n, k, x2.stride(0), ITERS=iters, NESTED=nested, BS=w.blocksize, BS2=w.nested_blocksize,
        SUB=cfg.sub, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", num_warps=cfg.warps)
    block = 1024
    sum_parts_kernel[(triton.cdiv(rows * n, block),)](parts, out, rows * n, N_PARTS=splits, BLOCK=block, num_warps=4)


def _config(x2: torch.Tensor, w: Nf4Weight) -> Nf4Config:
    """The fastest of ``CONFIGS`` for this weight shape (timed once, never while a CUDA graph is captured)."""
    key = (w.out_features, w.in_features, x2.dtype, x2.device)
    if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _chosen.get(key, CONFIGS[0])
    if key not in _chosen:
        out = torch.empty((x2.shape[0], w.out_features), dtype=x2.dtype, device=x2.device)
        times = {}
        for cfg in CONFIGS:
            _launch(x2, w, cfg, out)  # compile and warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                _launch(x2, w, cfg, out)
            end.record()
            end.synchronize()
            times[cfg] = start.elapsed_time(end)
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def nf4_linear(x: torch.Tensor, w: Nf4Weight, config: Nf4Config | None = None) -> torch.Tensor:
    """``x @ dequantize(W).T`` for x (..., K) of at most ``MAX_ROWS`` rows; (..., N) in x's dtype.

    ``config`` fixes the tile; by default the fastest of ``CONFIGS`` for the weight's shape.
    """
    return _rows_times_weight(x, w, "nf4_linear", lambda x2, out: _launch(x2, w, config or _config(x2, w), out))


def _rows_times_weight(x: torch.Tensor, w: Nf4Weight, name: str,
                       launch: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """x (..., K) as (rows, K), checked against ``MAX_ROWS`` and the weight; ``launch(x2, out)`` fills (rows, N)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    rows, k = x2.shape
    if rows > MAX_ROWS or k != w.in_features:
        raise ValueError(f"{name} takes up to {MAX_ROWS} rows of {w.in_features}, got {tuple(x.shape)}")
    out = torch.empty((rows, w.out_features), dtype=x.dtype, device=x.device)
    launch(x2, out)
    return out.reshape(*lead, w.out_features)


# ---- the tensor-core kernel (``mode="triton_tc"``): one quantization block at a time, absmax decoded per block

@triton.jit
def _nf4_tc_block(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, blk, nblk,
                  cols, nmask, rows, rmask, stride_xm, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                  W_LEFT: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + the products of quantization block ``blk`` (BS elements of K) of the weight rows ``cols``."""
    HALF: tl.constexpr = BS // 2
    j = tl.arange(0, HALF)
    valid = blk < nblk
    cmask = nmask & valid
    g = cols * nblk + blk  # (BLOCK_N,) global block index of each weight row
    if NESTED:  # absmax = code2[absmax_q] * absmax2[block // BS2] + offset, once per block
        a8 = tl.load(absmax_ptr + g, mask=cmask, other=0).to(tl.int32)
        am = tl.load(code2_ptr + a8) * tl.load(abs2_ptr + g // BS2, mask=cmask, other=0.0) + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + g, mask=cmask, other=0.0)
    byte = tl.load(w_ptr + g[:, None] * HALF + j[None, :], mask=cmask[:, None], other=0,
                   eviction_policy="evict_first").to(tl.int32)  # (BLOCK_N, HALF): even element in the high nibble
    dt = x_ptr.dtype.element_ty
    kk = blk * BS + tl.arange(0, BS)  # x's BS columns of this block, one wide load
    xx = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=rmask[:, None] & valid, other=0.0)
    if LUT >= 2:  # codes in K order (high nibble first), one dot of K = BS
        q = tl.interleave(byte >> 4, byte & 15)
        if LUT == 2:
            wt = (tl.load(code_ptr + q) * am[:, None]).to(dt)
        else:
            wt = tl.gather((tl.load(code_ptr + tl.arange(0, 16))[None, :] * am[:, None]).to(dt), q, axis=1)
        if W_LEFT:
            acc += tl.dot(wt, tl.trans(xx), input_precision=PRECISION)
        else:
            acc += tl.dot(xx, tl.trans(wt), input_precision=PRECISION)
        return acc
    if LUT == 0:  # the 16 codes from L1 per element, times the block's absmax, rounded like bitsandbytes
        hi = (tl.load(code_ptr + (byte >> 4)) * am[:, None]).to(dt)
        lo = (tl.load(code_ptr + (byte & 15)) * am[:, None]).to(dt)
    else:  # a (BLOCK_N, 16) table of code x absmax per block, gathered in registers
        table = (tl.load(code_ptr + tl.arange(0, 16))[None, :] * am[:, None]).to(dt)
        hi = tl.gather(table, byte >> 4, axis=1)
        lo = tl.gather(table, byte & 15, axis=1)
    xe, xo = tl.split(tl.reshape(xx, (xx.shape[0], HALF, 2)))  # even and odd columns
    if W_LEFT:  # weight tile as the left operand: acc (BLOCK_N, BLOCK_M)
        acc += tl.dot(hi, tl.trans(xe), input_precision=PRECISION)
        acc += tl.dot(lo, tl.trans(xo), input_precision=PRECISION)
    else:  # acc (BLOCK_M, BLOCK_N)
        acc += tl.dot(xe, tl.trans(hi), input_precision=PRECISION)
        acc += tl.dot(xo, tl.trans(lo), input_precision=PRECISION)
    return acc


@triton.jit
def _nf4_tc_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, out_ptr, res_ptr, lock_ptr,
                   M, N, nblk, stride_xm, ITERS, SPLITS, SPLIT: tl.constexpr, SERIAL: tl.constexpr,
                   NESTED: tl.constexpr, BS: tl.constexpr,
                   BS2: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   W_LEFT: tl.constexpr, LUT: tl.constexpr, PRECISION: tl.constexpr, FOR_LOOP: tl.constexpr):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    if W_LEFT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    first = sp * ITERS * SUB  # this split's first quantization block
    if FOR_LOOP:  # compiled: a loop over a runtime count (software-pipelined loads)
        for i in range(ITERS):
            for s in tl.static_range(SUB):
                acc = _nf4_tc_block(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr,
                                    first + i * SUB + s, nblk, cols, nmask, rows, rmask, stride_xm,
                                    NESTED, BS, BS2, W_LEFT, LUT, PRECISION)
    else:  # Triton's CPU interpreter cannot range() over a runtime count
        i = 0
        while i < ITERS:
            for s in tl.static_range(SUB):
                acc = _nf4_tc_block(acc, x_ptr, w_ptr, absmax_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr,
                                    first + i * SUB + s, nblk, cols, nmask, rows, rmask, stride_xm,
                                    NESTED, BS, BS2, W_LEFT, LUT, PRECISION)
            i += 1
    if W_LEFT:
        offs = rows[None, :] * N + cols[:, None]
        omask = rmask[None, :] & nmask[:, None]
    else:
        offs = rows[:, None] * N + cols[None, :]
        omask = rmask[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(out_ptr + sp * M * N + offs, acc, mask=omask)
        if SERIAL:  # the last program of this column tile to finish sums the parts (fixed order) into res
            tl.debug_barrier()  # every thread's part stored before the release below
            arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                total = tl.zeros(acc.shape, tl.float32)
                part = 0
                while part < SPLITS:
                    total += tl.load(out_ptr + part * M * N + offs, mask=omask, other=0.0, cache_modifier=".cg")
                    part += 1
                tl.store(res_ptr + offs, total.to(res_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next call
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@dataclass(frozen=True)
class Nf4TcConfig:
    """Tile of one ``triton_tc`` program: ``block_n`` weight rows x ``sub`` quantization blocks per iteration.

    ``lut``: 0 reads the 16 codes from L1 per element, 1 gathers from a per-block register table (code x
    absmax, rounded), both as two dots of even and odd columns; 2 and 3 the same lookups on the codes
    interleaved in K order, one dot. ``w_left``: the weight tile is tl.dot's left operand (acc block_n x 16).
    ``programs_per_sm``: K is split so that about this many programs run per SM (0: no split);
    ``serial``: the last program of each column tile sums the split parts (no second kernel; same order).
    """

    block_n: int = 64
    sub: int = 2
    warps: int = 4
    stages: int = 1
    programs_per_sm: int = 8
    lut: int = 0
    w_left: bool = True
    serial: bool = False

    def __str__(self) -> str:
        return (f"n{self.block_n}_sub{self.sub}_w{self.warps}_s{self.stages}_p{self.programs_per_sm}"
                f"_lut{self.lut}_{'wl' if self.w_left else 'xl'}{'_serial' if self.serial else ''}")


# Candidates the GPU profile times (``tc_candidates``); each compiles once for every shape. Compiled for sm_90
# on the CPU (Triton 3.6): stages > 1 with lut 0/2 pipelines the per-element code loads through shared memory
# (48-90 KB a program), so most use stages=1 and many programs per SM to keep loads in flight.
TC_CANDIDATES = (Nf4TcConfig(), Nf4TcConfig(lut=1), Nf4TcConfig(w_left=False), Nf4TcConfig(64, 4),
                 Nf4TcConfig(128, 2, 8, programs_per_sm=4), Nf4TcConfig(128, 2, 8, programs_per_sm=4, lut=1),
                 Nf4TcConfig(64, 2, 4, 2, lut=1), Nf4TcConfig(32, 4, w_left=False), Nf4TcConfig(256, 1, 8, programs_per_sm=2),
                 Nf4TcConfig(programs_per_sm=4), Nf4TcConfig(programs_per_sm=16), Nf4TcConfig(lut=2),
                 Nf4TcConfig(serial=True), Nf4TcConfig(128, 2, 8, programs_per_sm=4, serial=True),
                 Nf4TcConfig(64, 4, lut=1, serial=True), Nf4TcConfig(64, 2, 4, 3, programs_per_sm=4))
# The fixed table of the graph path: (rows class, out_features, in_features) -> tile; rows class 8 covers
# 1..8 rows, 16 covers 9..16. Filled from a GPU run of ``gemv_profile --sections nf4_floor``; other shapes
# get TC_DEFAULT. ``set_tc_configs`` replaces entries (the profile's tuned path). These entries are the tuned
# tiles of the H200 run of 2026-11-30 (docs/gpu_runs/nf4_h200.json, ``nf4_floor.tc_table``; 6 rows).
TC_TABLE: dict[tuple[int, int, int], Nf4TcConfig] = {
    (8, 4096, 4096): Nf4TcConfig(64, 4),
    (8, 4096, 11008): Nf4TcConfig(64, 4),
    (8, 11008, 4096): Nf4TcConfig(64, 2, programs_per_sm=16),
}
TC_DEFAULT = Nf4TcConfig()
TC_MAX_BLOCKSIZE = 256  # bitsandbytes' 4-bit default is 64


def rows_class(rows: int) -> int:
    """The table's row class of ``rows``: 8 (1..8 rows) or 16 (9..16)."""
    return 8 if rows <= 8 else 16


def tc_config(rows: int, w: Nf4Weight) -> Nf4TcConfig:
    """The fixed tile of ``TC_TABLE`` for this row count and weight shape (``TC_DEFAULT`` if none)."""
    return TC_TABLE.get((rows_class(rows), w.out_features, w.in_features), TC_DEFAULT)


def set_tc_configs(configs: dict[tuple[int, int, int], Nf4TcConfig]) -> None:
    """Replace ``TC_TABLE`` entries: (rows class, out_features, in_features) -> tile."""
    TC_TABLE.update(configs)


def _tc_splits(blocks: int, n: int, cfg: Nf4TcConfig, device: torch.device) -> tuple[int, int]:
    """(splits of K, iterations of ``cfg.sub`` blocks per split)."""
    return split_k(triton.cdiv(blocks, cfg.sub), n, cfg.block_n, cfg.programs_per_sm, device)


def _launch_tc(x2: torch.Tensor, w: Nf4Weight, cfg: Nf4TcConfig, out: torch.Tensor) -> None:
    rows = x2.shape[0]
    n, nblk = w.out_features, w.in_features // w.blocksize
    splits, iters = _tc_splits(nblk, n, cfg, x2.device)
    col_programs = triton.cdiv(n, cfg.block_n)
    serial = splits > 1 and cfg.serial and w.locks is not None and col_programs <= w.locks.numel()
    target = torch.empty((splits, rows, n), dtype=torch.float32, device=x2.device) if splits > 1 else out
    nested = w.nested_absmax is not None
    dummy = w.code
    cuda = x2.device.type == "cuda"
    _nf4_tc_kernel[(col_programs, splits)](
        x2, w.packed, w.absmax, w.code, w.nested_absmax if nested else dummy, w.nested_code if nested else dummy,
        w.offset if nested else dummy, target, out, w.locks if serial else dummy, rows, n, nblk, x2.stride(0),
        iters, splits, SPLIT=splits > 1, SERIAL=serial, NESTED=nested, BS=w.blocksize, BS2=w.nested_blocksize,
        SUB=cfg.sub, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, W_LEFT=cfg.w_left, LUT=cfg.lut,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", FOR_LOOP=cuda, num_warps=cfg.warps,
        **({"num_stages": cfg.stages} if cuda else {}))
    if splits > 1 and not serial:
        block = 1024
        sum_parts_kernel[(triton.cdiv(rows * n, block),)](target, out, rows * n, N_PARTS=splits, BLOCK=block,
                                                           num_warps=4)


def nf4_linear_tc(x: torch.Tensor, w: Nf4Weight, config: Nf4TcConfig | None = None) -> torch.Tensor:
    """``x @ dequantize(W).T`` on the tensor cores, for x (..., K) of at most ``MAX_ROWS`` rows; (..., N).

    Same contract as ``nf4_linear`` (each weight element is code x absmax in fp32, rounded to x's
    dtype, as bitsandbytes' dequantize does); ``config`` fixes the tile, by default ``tc_config``.
    Quantization blocks over ``TC_MAX_BLOCKSIZE`` (one block is one tile's K) go to ``nf4_linear``.
    """
    if w.blocksize > TC_MAX_BLOCKSIZE:
        return nf4_linear(x, w)
    return _rows_times_weight(x, w, "nf4_linear_tc",
                              lambda x2, out: _launch_tc(x2, w, config or tc_config(x2.shape[0], w), out))
