"""Triton kernels for the CUDA-graph decode step (batch 1, 1..gamma+1 new tokens).

Imported only by ``LlamaRunner.use_kernels`` and only when Triton is importable and the model is
on CUDA (``available()``), so CPU-only installs never touch it. Each kernel mirrors the rounding
of the eager reference in ``common.models.decoder`` (float32 math, one rounding where torch rounds),
so fused and eager outputs agree within bf16 tolerance:

- ``add_rms_norm``: residual add + RMSNorm in one pass (returns the normed input and the new residual);
- ``rope_kv_write``: rotary on q and k, k and v written into the static cache at their positions;
- ``silu_mul``: SiLU(gate) * up over the fused gate/up projection;
- ``decode_attention``: split-K (flash-decoding) attention of the new rows over the static cache,
  reading only the live positions (up to the furthest row's position), every query row from the
  same K/V tiles, so verifying gamma + 1 rows reads the cache once, like a decode step; with
  ``tree_slots`` a draft tree's rows, each at its virtual position over its own path (``common.tree``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or Triton's CPU interpreter in tests)."""
    import os

    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_out_ptr.dtype.element_ty)  # the residual rounds as torch's add does
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x (T, H); without residual, of x alone."""
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(rows,)](x, residual.contiguous() if residual is not None else x, weight, out, res_out,
                                  n, float(eps), HAS_RES=residual is not None,
                                  BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out, res_out


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                    stride_t, stride_head, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                    HDP: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HDP)  # HD padded to a power of two
    dm = d < HD
    half: tl.constexpr = HD // 2
    base = qkv_ptr + t * stride_t + h * HD
    x = tl.load(base + d, mask=dm, other=0.0).to(tl.float32)
    partner = tl.load(base + tl.where(d < half, d + half, d - half), mask=dm, other=0.0).to(tl.float32)
    rot = tl.where(d < half, -partner, partner)  # rotate_half: cat(-x2, x1)
    c = tl.load(cos_ptr + t * HD + d, mask=dm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * HD + d, mask=dm, other=0.0).to(tl.float32)
    dt = q_out_ptr.dtype.element_ty
    out = ((x * c).to(dt).to(tl.float32) + (rot * s).to(dt).to(tl.float32)).to(dt)
    if h < NH:
        tl.store(q_out_ptr + (t * NH + h) * HD + d, out, mask=dm)
    else:
        kvh = h - NH
        pos = tl.load(pos_ptr + t)
        dst = kvh * stride_head + pos * HD + d
        tl.store(k_cache_ptr + dst, out.to(k_cache_ptr.dtype.element_ty), mask=dm)
        v = tl.load(qkv_ptr + t * stride_t + (NH + NKV + kvh) * HD + d, mask=dm, other=0.0)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=dm)


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Rotary on q and k of the fused projection qkv (T, (NH + 2 NKV) HD); k, v go into the cache.

    ``cos``/``sin`` are (T, HD) as the model's rotary embedding returns them, ``keys``/``values`` one
    layer's cache (NKV, capacity, HD), contiguous. Returns the rotated queries (T, NH, HD).
    """
    rows = qkv.shape[0]
    head_dim = keys.shape[-1]
    q = torch.empty((rows, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_kv_kernel[(rows, num_heads + num_kv_heads)](
        qkv, cos.contiguous(), sin.contiguous(), positions, q, keys, values, qkv.stride(0), keys.stride(0),
        NH=num_heads, NKV=num_kv_heads, HD=head_dim, HDP=triton.next_power_of_2(head_dim), num_warps=1)
    return q


@triton.jit
def _block_update(q, k, v, cols, pos, hidden, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """One key block's online-softmax update of every row: (m, l, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    # causal, and the first ``hidden`` positions (a widened twin's masked visual padding) are
    # read like any key but hidden from every later position
    seen = (cols[None, :] <= pos[:, None]) & ((cols[None, :] >= hidden) | (pos[:, None] < hidden))
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _gather_kv(k_ptr, v_ptr, tree_ptr, kv_base, cols, cmask, r, base, n_rows, d, dm, HD: tl.constexpr):
    """Keys and values of one block as tree row r sees them: virtual column c >= base from its own slot
    tree[r, c - base] (its pending row or ancestor there), columns below base from their own slot."""
    region = (cols >= base) & cmask
    slot = tl.load(tree_ptr + r * n_rows + (cols - base), mask=region, other=0)
    slot = tl.where(region, slot, cols)
    offs = kv_base + slot[:, None] * HD + d[None, :]
    k = tl.load(k_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
    v = tl.load(v_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
    return k, v


@triton.jit
def _split_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, tree_ptr, o_ptr, m_ptr, l_ptr, n_rows, n_splits, stride_kh,
                       scale, hidden, NH: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr, HAS_TREE: tl.constexpr):
    h = tl.program_id(0)
    pid = tl.program_id(1)
    kvh = h // GROUP
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    pos = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    last = tl.max(pos, axis=0)  # the furthest key any row attends to
    d = tl.arange(0, HDP)  # HD padded to a power of two
    dm = d < HD
    q = tl.load(q_ptr + (rows[:, None] * NH + h) * HD + d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HDP), tl.float32)
    if HAS_TREE:
        # a tree step's region starts at its first row's position. Programs pid < n_splits serve chunk pid
        # for every row, unless it meets the region; each chunk meeting the region gets one program per
        # row g (the n_splits + e programs: chunk first + e // n_rows, row e % n_rows), over that row's
        # own gathered keys, storing that row only
        base = tl.min(tl.where(rmask, pos, last), axis=0)
        shared = pid < n_splits
        e = tl.maximum(pid - n_splits, 0)
        sp = tl.where(shared, pid, base // SPLIT + e // n_rows)
        g = tl.where(shared, 0, e % n_rows)
        start = sp * SPLIT
        in_region = (start + SPLIT > base) & (start <= last)
        work = shared != in_region  # a shared program off the region, or a row's program on it
        keep = rmask & work & (shared | (rows == g))
    else:
        sp = pid
        start = sp * SPLIT
        keep = rmask
    for i in range(SPLIT // BLOCK_N):  # chunks past the furthest position skip their loads
        n0 = start + i * BLOCK_N
        if HAS_TREE:
            live = (n0 <= last) & work
        else:
            live = n0 <= last
        if live:
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols <= last
            offs = kvh * stride_kh + cols[:, None] * HD + d[None, :]
            if HAS_TREE:
                if n0 + BLOCK_N > base:
                    k, v = _gather_kv(k_ptr, v_ptr, tree_ptr, kvh * stride_kh, cols, cmask, g, base, n_rows, d, dm, HD)
                else:
                    k = tl.load(k_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
                    v = tl.load(v_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
            else:
                k = tl.load(k_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
                v = tl.load(v_ptr + offs, mask=cmask[:, None] & dm[None, :], other=0.0)
            m_i, l_i, acc = _block_update(q, k, v, cols, pos, hidden, m_i, l_i, acc, scale, PRECISION)
    part = (sp * n_rows + rows) * NH + h
    tl.store(o_ptr + part[:, None] * HD + d[None, :], acc, mask=keep[:, None] & dm[None, :])
    tl.store(m_ptr + part, m_i, mask=keep)
    tl.store(l_ptr + part, l_i, mask=keep)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, n_rows, n_splits, NH: tl.constexpr, HD: tl.constexpr,
                    HDP: tl.constexpr, BLOCK_S: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < n_splits
    part = (sp * n_rows + t) * NH + h
    m = tl.load(m_ptr + part, mask=smask, other=float("-inf"))
    l_s = tl.load(l_ptr + part, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    d = tl.arange(0, HDP)
    dm = d < HD
    o = tl.load(o_ptr + part[:, None] * HD + d[None, :], mask=smask[:, None] & dm[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + (t * NH + h) * HD + d, out.to(out_ptr.dtype.element_ty), mask=dm)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scale: float, split: int = 128, block_n: int = 64, masked_prefix: int = 0,
                     tree_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q (T, NH, HD) at ``positions`` (T,) over one layer's cache (NKV, capacity, HD).

    Row i attends keys 0..positions[i], except that keys below ``masked_prefix`` are hidden from rows at
    or past it (they are still read, so the step costs what it would with real tokens there). The keys
    are cut into ``split``-position chunks, one program per (head, chunk) for all T rows; chunks past
    the furthest position exit at once. Returns (T, NH * HD).

    ``tree_slots`` (T, T) integer: a tree step, whose rows sit at virtual ``positions`` (base =
    ``positions.min()``, the first row's): row i reads virtual position base + j from cache slot
    ``tree_slots[i, j]`` (its ancestor's row), positions below base from their own slot. Each row
    then sees exactly the keys, blocks and arithmetic of a causal step at its virtual position. The
    chunks meeting the region run one program per row (the row's own gathered tiles, same shapes); a
    tree's virtual positions span at most its T rows, so the region meets at most
    ``cdiv(T - 1, split) + 1`` chunks, and only those get per-row programs.
    """
    rows, num_heads, head_dim = q.shape
    capacity = keys.shape[1]
    block_n = min(block_n, split)
    n_splits = triton.cdiv(capacity, split)
    if tree_slots is not None and tuple(tree_slots.shape) != (rows, rows):
        raise ValueError(f"tree_slots must be ({rows}, {rows}), got {tuple(tree_slots.shape)}")
    o = torch.empty((n_splits, rows, num_heads, head_dim), dtype=torch.float32, device=q.device)
    m = torch.empty((n_splits, rows, num_heads), dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # a tree step: one more program per row for each chunk its region can meet (not per row for every
    # chunk: that made 16x the programs, almost all exiting at once, and cost ~0.8 ms per 16-row forward of a
    # 7B-shape target on an H200: tree_verify_profile 6.17 -> 5.34 ms)
    region_programs = (triton.cdiv(rows - 1, split) + 1) * rows if tree_slots is not None else 0
    grid = (num_heads, n_splits + region_programs)
    _split_attn_kernel[grid](
        q.contiguous(), keys, values, positions, positions if tree_slots is None else tree_slots.contiguous(),
        o, m, l_sum, rows, n_splits, keys.stride(0), float(scale), int(masked_prefix),
        NH=num_heads, GROUP=num_heads // keys.shape[0], HD=head_dim, HDP=max(16, triton.next_power_of_2(head_dim)),
        SPLIT=split,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, PRECISION=precision,
        HAS_TREE=tree_slots is not None, num_warps=4, num_stages=2)
    out = torch.empty((rows, num_heads * head_dim), dtype=q.dtype, device=q.device)
    _combine_kernel[(rows, num_heads)](o, m, l_sum, out, rows, n_splits, NH=num_heads, HD=head_dim,
                                       HDP=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(n_splits), num_warps=4)
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + t * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + t * n_cols + cols, (act * u).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the fused projection (T, 2 I) laid out [gate | up]; returns (T, I)."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out
