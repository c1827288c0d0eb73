"""A LLaMA decoder runner with our own KV cache, shared by both models.

Both EventGPT and Video-LLaVA end in a LLaMA-2 (Vicuna-7B) decoder. Instead of driving
transformers' ``Cache`` classes (whose API changes across 5.x releases), this module runs
the decoder layers of a loaded ``LlamaModel`` directly over a preallocated KV cache:

- truncation after a rejected draft is O(1) (the cache just forgets positions);
- 1..k new tokens go through the same call, so decode and verification are one path;
- shapes can be kept static (``attend_len``) so the step can be CUDA-graph captured;
- any module transformers builds (``nn.Linear``, bitsandbytes ``Linear4bit``/``Linear8bitLt``)
  is called as a module, so quantized checkpoints run unchanged.

Hidden-state layer indices follow transformers' ``hidden_states`` tuple: 0 is the token
embeddings, ``i`` the output of decoder layer ``i``, and ``num_layers`` (or -1) the final
normed state that feeds the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.timing import CAPTURE_LOCK

NF4_MODES = ("triton", "triton_tc", "dequant")  # LlamaRunner.use_nf4_kernel's multi-row paths


@dataclass
class DecoderShape:
    """Sizes of a LLaMA decoder needed to size its cache."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """Read the sizes from a ``LlamaConfig``."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
        )


class KVCache:
    """Preallocated keys and values of every layer, growing by reallocation when full.

    ``batch`` rows share one capacity; the speculative engine uses batch 1 (``length`` is then
    the cache's fill), batched greedy decoding tracks each row's length itself.
    """

    def __init__(self, shape: DecoderShape, capacity: int, dtype: torch.dtype, device: torch.device,
                 batch: int = 1):
        self.shape = shape
        size = (shape.num_layers, int(batch), shape.num_kv_heads, max(int(capacity), 1), shape.head_dim)
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        """How many positions fit before the cache must grow."""
        return self.keys.shape[3]

    def ensure_capacity(self, needed: int) -> None:
        """Grow (by doubling) so that ``needed`` positions fit; keeps the content."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], new_cap, old.shape[4]))
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Forget every position at or after ``length`` (a rejected draft's keys)."""
        if length < 0 or length > self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def row(self, index: int) -> KVCache:
        """A batch-1 cache viewing row ``index`` (shares storage; must not grow), empty."""
        other = KVCache.__new__(KVCache)
        other.shape, other.length = self.shape, 0
        other.keys, other.values = self.keys[:, index:index + 1], self.values[:, index:index + 1]
        return other

    def clone(self) -> KVCache:
        """An independent copy (for tests and branching)."""
        other = KVCache.__new__(KVCache)
        other.shape, other.length = self.shape, self.length
        other.keys, other.values = self.keys.clone(), self.values.clone()
        return other


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (LLaMA's rotate-half form) of ``x`` with the given cos/sin rows."""
    return x * cos + _rotate_half(x) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm computed in float32: ``weight * x / rms(x)``, back in ``x``'s dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _concat_weights(linears: list[nn.Linear]) -> torch.Tensor:
    """One (sum of out, in) weight; each Linear's weight becomes a view into it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        start += rows
    return weight


class VocabLimitedHead(nn.Module):
    """An LM head whose rows at or above ``limit`` (a widened twin's padded vocabulary) score -inf.

    The padding ids then have probability 0 under sampling as well as under greedy decoding, and the
    head still multiplies by every row, so it costs what the full-vocabulary head costs.
    """

    def __init__(self, head: nn.Module, limit: int):
        super().__init__()
        self.head = head
        self.limit = int(limit)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped head's weight (all rows)."""
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every row; padding rows are -inf."""
        logits = self.head(x)
        logits[..., self.limit:] = float("-inf")
        return logits


@dataclass
class TreeRows:
    """A tree step's rows for ``LlamaRunner.static_step``: virtual ``positions`` (k,) (rotary and
    attention; the first row's is the cache length) and ``slots`` (k, k): the cache slot row i reads
    for virtual position ``positions[0] + j`` (its pending rows and ancestors; identity past its own)."""

    positions: torch.Tensor
    slots: torch.Tensor


class LlamaRunner:
    """Runs a transformers ``LlamaModel`` (layers, norm, rotary) plus an LM head over a ``KVCache``."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, masked_prefix: int = 0,
                 gemv: str = "cublas"):
        """``gemv``: the dense linears of the fused step through cuBLAS or the Triton GEMV (``use_gemv``)."""
        self.language_model = language_model
        self.lm_head = lm_head
        # the first ``masked_prefix`` positions of every sequence (a widened twin's visual padding) are
        # computed but hidden from every later position
        self.masked_prefix = int(masked_prefix)
        self.shape = DecoderShape.from_config(language_model.config)
        self.layers = list(language_model.layers)[: self.shape.num_layers]
        self._fused: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kernels: Any = None  # common.models.kernels once use_kernels(True) succeeded
        self._prefill_kernels: Any = None  # the same module once use_prefill_kernels(True) succeeded
        self._nf4: dict[int, Any] = {}  # id(Linear4bit) -> common.models.nf4_kernels.Nf4Weight (use_nf4_kernel)
        self._nf4_max_rows = 0
        self._nf4_mode = "triton"  # or "triton_tc" (the tensor-core kernel), or "dequant": into a scratch matrix
        self._nf4_scratch: torch.Tensor | None = None
        self._gemv: Any = None  # common.models.gemv once use_gemv("triton") succeeded
        self.use_gemv(gemv)

    def fuse_projections(self) -> bool:
        """Concatenate each layer's q/k/v and gate/up weights into one matrix (one GEMV instead of 3 and 2).

        The modules keep working: their weights become views into the concatenated tensors, so
        no memory is duplicated. Only plain ``nn.Linear`` layers without bias are fused
        (quantized layers are left alone); returns whether fusion is on.
        """
        if self._fused is not None:
            return True
        fused = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
            if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
                return False
            fused.append((_concat_weights([attn.q_proj, attn.k_proj, attn.v_proj]),
                          _concat_weights([mlp.gate_proj, mlp.up_proj])))
        self._fused = fused
        return True

    def use_kernels(self, on: bool = True) -> bool:
        """Run ``static_step`` (the CUDA-graph path) through the Triton kernels of ``common.models.kernels``.

        Needs SiLU, an even head size, bias-free q/k/v and gate/up projections (fused when they are
        plain ``nn.Linear``; quantized ones are concatenated per step) and Triton on a CUDA device;
        otherwise (and on CPU, where Triton is never imported) it stays on the eager ops and returns
        False. The eager ``run`` path is the reference and never changes.
        """
        self._kernels = self._kernel_module() if on else None
        return self._kernels is not None

    def use_prefill_kernels(self, on: bool = True) -> bool:
        """Run a fresh prompt's prefill (``run`` from an empty cache) through the Triton kernels too.

        Fused add+RMSNorm, rotary+KV-cache write and SiLU*up over every prompt row, fused q/k/v and
        gate/up GEMMs, and the causal flash kernel of SDPA (a masked prefix runs as its own causal
        block: nothing after it attends to it). Same conditions as ``use_kernels``; returns whether on.
        """
        self._prefill_kernels = self._kernel_module() if on else None
        return self._prefill_kernels is not None

    def _kernel_module(self) -> Any:
        """``common.models.kernels`` when the Triton kernels can run this decoder, else None."""
        self.fuse_projections()  # no-op (False) for quantized layers: their outputs are concatenated
        layer = self.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        if any(getattr(m, "bias", None) is not None
               for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)):
            return None
        device = self.language_model.norm.weight.device
        act = getattr(self.language_model.config, "hidden_act", "silu")
        if act != "silu" or self.shape.head_dim % 2 or (device.type != "cuda" and not _interpreting()):
            return None
        try:
            from common.models import kernels
        except ImportError:  # no Triton in this install
            return None
        return kernels if kernels.available(device) else None

    def use_nf4_kernel(self, on: bool = True, max_rows: int = 16, mode: str = "triton") -> bool:
        """Multiply 2..``max_rows``-row inputs of bitsandbytes nf4 layers without bitsandbytes' multi-row path.

        ``mode="triton"``: ``common.models.nf4_kernels`` reads each packed 4-bit weight once for all
        rows (bitsandbytes dequantizes the whole weight to bf16 first, or uses a kernel slower than its
        one-row GEMV on Hopper). ``mode="triton_tc"``: its tensor-core kernel (``nf4_linear_tc``: absmax
        decoded once per block, a fixed tile per shape). ``mode="dequant"``: each weight is dequantized into one reused scratch
        matrix, then multiplied by cuBLAS (or the Triton GEMV, ``use_gemv``). One-row inputs keep
        bitsandbytes' GEMV, larger ones its dequantize + GEMM. Needs CUDA (or Triton's interpreter for
        "triton"); returns whether any layer uses it.
        """
        if mode not in NF4_MODES:
            raise ValueError(f"nf4 multi-row mode must be one of {', '.join(map(repr, NF4_MODES))}, got {mode!r}")
        self._nf4, self._nf4_max_rows, self._nf4_mode, self._nf4_scratch = {}, int(max_rows), mode, None
        device = self.language_model.norm.weight.device
        if not on or (device.type != "cuda" and not _interpreting()):
            return False
        try:
            from common.models import nf4_kernels
        except ImportError:  # no Triton in this install
            return False
        for layer in self.layers:
            for module in layer.modules():
                weight = nf4_kernels.nf4_weight(module)
                if weight is not None:
                    self._nf4[id(module)] = weight
        if self._nf4 and mode == "dequant":
            size = max(w.out_features * w.in_features for w in self._nf4.values())
            self._nf4_scratch = torch.empty(size, dtype=self.language_model.norm.weight.dtype, device=device)
        return bool(self._nf4)

    def use_gemv(self, kind: str = "triton") -> bool:
        """The fused step's dense linears (q/k/v, o, gate/up, down, LM head) through cuBLAS or the Triton GEMV.

        ``kind`` is "cublas" (``F.linear``) or "triton" (``common.models.gemv``, CUDA or Triton's
        interpreter only; elsewhere it stays on cuBLAS). The eager path never changes. Returns whether
        the Triton GEMV is on.
        """
        if kind not in ("cublas", "triton"):
            raise ValueError(f"gemv must be 'cublas' or 'triton', got {kind!r}")
        self._gemv = None
        device = self.language_model.norm.weight.device
        if kind == "triton" and (device.type == "cuda" or _interpreting()):
            try:
                from common.models import gemv
            except ImportError:  # no Triton in this install
                return False
            self._gemv = gemv
        return self._gemv is not None

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight)``, through the Triton GEMV for a few rows when ``use_gemv("triton")``."""
        if self._gemv is not None and x.numel() // x.shape[-1] <= self._gemv.MAX_ROWS:
            return self._gemv.gemv(x, weight)
        return F.linear(x, weight)

    def _linear(self, module: nn.Module, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        """``module(x)``, or the nf4 path for a few rows of an nf4 layer (``use_nf4_kernel``).

        ``step``: the fused step, where a plain bias-free ``nn.Linear`` goes through ``_dense``.
        """
        weight = self._nf4.get(id(module)) if self._nf4 else None
        rows = x.numel() // x.shape[-1]
        if weight is None or not 2 <= rows <= self._nf4_max_rows:
            if step and type(module) is nn.Linear and module.bias is None:
                return self._dense(x, module.weight)
            return module(x)
        if self._nf4_mode == "dequant":
            import bitsandbytes as bnb

            dense = self._nf4_scratch[: weight.out_features * weight.in_features].view(
                weight.out_features, weight.in_features)
            if dense.device.type == "cuda":
                bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state, out=dense)
            else:  # bitsandbytes' CPU backend has no ``out`` variant
                dense.copy_(bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
            return self._dense(x, dense) if step else F.linear(x, dense)
        from common.models import nf4_kernels

        if self._nf4_mode == "triton_tc":
            return nf4_kernels.nf4_linear_tc(x, weight)
        return nf4_kernels.nf4_linear(x, weight)

    def _qkv(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x side by side (..., (NH + 2 NKV) HD): one GEMM when fused (the fused step's)."""
        if self._fused is not None:
            return self._dense(x, self._fused[idx][0])
        attn = self.layers[idx].self_attn
        return torch.cat([self._linear(m, x, step=True) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)

    def _gate_up(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """gate and up projections of x side by side (..., 2 I): one GEMM when fused (the fused step's)."""
        if self._fused is not None:
            return self._dense(x, self._fused[idx][1])
        mlp = self.layers[idx].mlp
        return torch.cat([self._linear(mlp.gate_proj, x, step=True), self._linear(mlp.up_proj, x, step=True)],
                         dim=-1)

    @property
    def kernels_on(self) -> bool:
        """Whether ``static_step`` runs the fused Triton kernels."""
        return self._kernels is not None

    def _fused_step(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    tree: TreeRows | None = None) -> torch.Tensor:
        """All layers and the final norm for one row of k new tokens with the Triton kernels; (k, H).

        With ``tree``, row i is still written at ``positions[i]`` but rotated and attended as if at
        ``tree.positions[i]`` over its own path (``tree.slots``; see ``kernels.decode_attention``).
        """
        kern, s = self._kernels, self.shape
        rope_at = positions if tree is None else tree.positions
        attend_at, slots = (positions, None) if tree is None else (tree.positions, tree.slots)
        cos, sin = self.language_model.rotary_emb(x, rope_at[None, :])
        x = x[0]
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(self.language_model.norm)
        h, _ = kern.add_rms_norm(x, None, norms[0].weight, _eps(norms[0]))
        res = x
        for idx, layer in enumerate(self.layers):
            q = kern.rope_kv_write(self._qkv(idx, h), cos[0], sin[0], positions,
                                   cache.keys[idx, 0], cache.values[idx, 0], s.num_heads, s.num_kv_heads)
            attn = kern.decode_attention(q, cache.keys[idx, 0], cache.values[idx, 0], attend_at,
                                         s.head_dim ** -0.5, masked_prefix=self.masked_prefix, tree_slots=slots)
            post, nxt = norms[2 * idx + 1], norms[2 * idx + 2]
            h, res = kern.add_rms_norm(self._linear(layer.self_attn.o_proj, attn, step=True), res, post.weight,
                                       _eps(post))
            mlp = self._linear(layer.mlp.down_proj, kern.silu_mul(self._gate_up(idx, h)), step=True)
            h, res = kern.add_rms_norm(mlp, res, nxt.weight, _eps(nxt))
        return h

    def _kernel_prefill(self, x: torch.Tensor, cache: KVCache, wanted: set[int]
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A fresh prompt x (1, T, H) through every layer and the final norm with the Triton kernels.

        Same math as ``run_layers`` from an empty cache; returns the normed output (1, T, H) and the
        wanted layers' states (1, T, H).
        """
        kern, s, t = self._prefill_kernels, self.shape, x.shape[1]
        positions = torch.arange(t, device=x.device)
        cos, sin = self.language_model.rotary_emb(x, positions[None, :])
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(self.language_model.norm)
        hidden = {0: x} if 0 in wanted else {}
        h, res = kern.add_rms_norm(x[0], None, norms[0].weight, _eps(norms[0]))
        for idx, layer in enumerate(self.layers):
            keys, values = cache.keys[idx, 0], cache.values[idx, 0]
            q = kern.rope_kv_write(self._qkv(idx, h), cos[0], sin[0], positions, keys, values,
                                   s.num_heads, s.num_kv_heads)
            attn = self._prompt_attention(q, keys[:, :t], values[:, :t])
            post, nxt = norms[2 * idx + 1], norms[2 * idx + 2]
            h, res = kern.add_rms_norm(self._linear(layer.self_attn.o_proj, attn, step=True), res, post.weight,
                                       _eps(post))
            mlp = self._linear(layer.mlp.down_proj, kern.silu_mul(self._gate_up(idx, h)), step=True)
            h, res = kern.add_rms_norm(mlp, res, nxt.weight, _eps(nxt))
            if idx + 1 in wanted and idx + 1 != s.num_layers:
                hidden[idx + 1] = res[None]
        if s.num_layers in wanted:
            hidden[s.num_layers] = h[None]
        return h[None], hidden

    def _prompt_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal attention of a fresh prompt: q (T, NH, HD), keys/values (NKV, T, HD); returns (T, NH * HD).

        Plain causal SDPA (its flash kernel). A masked prefix is its own causal block and the rows
        after it a second one over their own keys: exactly ``visible``, as nothing later attends to the prefix.
        """
        s, t = self.shape, q.shape[0]
        if s.num_kv_heads != s.num_heads:
            rep = s.num_heads // s.num_kv_heads
            keys, values = keys.repeat_interleave(rep, dim=0), values.repeat_interleave(rep, dim=0)
        q, keys, values = q.transpose(0, 1)[None], keys[None].to(q.dtype), values[None].to(q.dtype)
        cut = min(self.masked_prefix, t)
        blocks = [(0, cut), (cut, t)] if 0 < cut < t else [(0, t)]
        outs = [F.scaled_dot_product_attention(q[:, :, a:b], keys[:, :, a:b], values[:, :, a:b], is_causal=True)
                for a, b in blocks]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[0].transpose(0, 1).reshape(t, s.num_heads * s.head_dim)

    def new_cache(self, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """An empty cache for ``capacity`` positions."""
        return KVCache(self.shape, capacity, dtype, device)

    def _attention(self, layer: nn.Module, x: torch.Tensor, cache: KVCache, layer_idx: int,
                   positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend_len: int,
                   mask: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        s = self.shape
        rows, k_new = x.shape[0], x.shape[1]
        if self._fused is not None:  # one GEMV for q, k, v and one rotary pass over q and k
            qkv = F.linear(x, self._fused[layer_idx][0]).view(rows, k_new, s.num_heads + 2 * s.num_kv_heads,
                                                               s.head_dim)
            qk = apply_rope(qkv[:, :, : s.num_heads + s.num_kv_heads].transpose(1, 2), cos, sin)
            q, k = qk[:, : s.num_heads], qk[:, s.num_heads:]
            v = qkv[:, :, s.num_heads + s.num_kv_heads:].transpose(1, 2)
        else:
            q = self._linear(attn.q_proj, x).view(rows, k_new, s.num_heads, s.head_dim).transpose(1, 2)
            k = self._linear(attn.k_proj, x).view(rows, k_new, s.num_kv_heads, s.head_dim).transpose(1, 2)
            v = self._linear(attn.v_proj, x).view(rows, k_new, s.num_kv_heads, s.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.keys[layer_idx], cache.values[layer_idx]
        if positions.dim() == 1:  # one row (or rows at the same positions)
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
        else:  # each row writes at its own positions (rows, k)
            row_ids = torch.arange(rows, device=positions.device)[:, None]
            keys[row_ids, :, positions] = k.transpose(1, 2).to(keys.dtype)
            values[row_ids, :, positions] = v.transpose(1, 2).to(values.dtype)
        keys, values = keys[:, :, :attend_len], values[:, :, :attend_len]
        if s.num_kv_heads != s.num_heads:
            rep = s.num_heads // s.num_kv_heads
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                             is_causal=mask is None)
        return self._linear(attn.o_proj, out.transpose(1, 2).reshape(rows, k_new, s.num_heads * s.head_dim))

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm; with fused projections, torch's fused rms_norm (same math in float32)."""
        if self._fused is None:
            return norm(x)
        return rms_norm(x, norm.weight, _eps(norm))

    def _mlp(self, layer: nn.Module, idx: int, x: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        if self._fused is not None:
            gate, up = F.linear(x, self._fused[idx][1]).chunk(2, dim=-1)
        elif self._nf4:
            gate, up = self._linear(mlp.gate_proj, x), self._linear(mlp.up_proj, x)
        else:
            return mlp(x)
        return self._linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def visible(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Which key positions each query position attends to: causal, the masked prefix hidden from the rest."""
        mask = keys <= queries
        if self.masked_prefix:
            mask = mask & ((keys >= self.masked_prefix) | (queries < self.masked_prefix))
        return mask

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, attend_len: int, cache: KVCache,
                wanted: set[int], causal_prefill: bool = False, attn_mask: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """All decoder layers and the final norm over x (rows, k, H) written at ``positions``.

        ``positions`` is (k,) when every row sits at the same positions, or (rows, k). Returns the
        normed output (rows, k, H) and the wanted layers' states, each (rows, k, H). An explicit
        boolean ``attn_mask`` (k, attend_len) and rotary ``rope_positions`` (k,) replace the
        position-causal ones (tree verification: rows written at ``positions``, rotated by depth).
        """
        keys = torch.arange(attend_len, device=x.device)
        if attn_mask is not None:  # tree rows sit past any masked prefix, which stays hidden from them
            mask = attn_mask & (keys >= self.masked_prefix)[None, :] if self.masked_prefix else attn_mask
            position_ids = (positions if rope_positions is None else rope_positions)[None, :]
        elif causal_prefill and not self.masked_prefix:
            mask = None  # a fresh prompt: plain causal attention (flash kernels)
            position_ids = positions[None, :]
        elif positions.dim() == 1:
            mask = self.visible(keys[None, :], positions[:, None])
            position_ids = positions[None, :]
        else:
            mask = self.visible(keys[None, None, :], positions[:, :, None])[:, None]
            position_ids = positions
        cos, sin = self.language_model.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        hidden: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            hidden[0] = x
        for idx, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x)
            x = x + self._attention(layer, h, cache, idx, positions, cos, sin, attend_len, mask)
            x = x + self._mlp(layer, idx, self._norm(layer.post_attention_layernorm, x))
            if idx + 1 in wanted and idx + 1 != self.shape.num_layers:
                hidden[idx + 1] = x
        x = self.language_model.norm(x)
        if self.shape.num_layers in wanted:
            hidden[self.shape.num_layers] = x
        return x, hidden

    def run(self, inputs_embeds: torch.Tensor, cache: KVCache, hidden_layers: Sequence[int] = (),
            all_logits: bool = True, attn_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Append ``inputs_embeds`` (1, k, H) at the cache's end; return logits and chosen hidden states.

        Returns float32 logits (k, V) (only the last row, shape (1, V), when ``all_logits`` is
        False: a long prefill then skips the LM head on every prompt position) and a dict
        layer -> (k, H) hidden states for the requested ``hidden_layers``. ``attn_mask`` (boolean
        (k, length + k)) and ``position_ids`` (k,) are the optional tree mask and rotary positions.
        """
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds.unsqueeze(0)
        k_new = inputs_embeds.shape[1]
        start = cache.length
        cache.ensure_capacity(start + k_new)
        positions = torch.arange(start, start + k_new, device=inputs_embeds.device)
        wanted = {self.layer_index(i) for i in hidden_layers}
        if attn_mask is not None and tuple(attn_mask.shape) != (k_new, start + k_new):
            raise ValueError(f"attn_mask must be ({k_new}, {start + k_new}), got {tuple(attn_mask.shape)}")
        causal_prefill = start == 0 and k_new > 1 and attn_mask is None
        if causal_prefill and self._prefill_kernels is not None and inputs_embeds.shape[0] == 1:
            x, hidden = self._kernel_prefill(inputs_embeds, cache, wanted)
        else:
            x, hidden = self.run_layers(inputs_embeds, positions, start + k_new, cache, wanted,
                                        causal_prefill=causal_prefill, attn_mask=attn_mask,
                                        rope_positions=position_ids)
        cache.length = start + k_new
        head_in = x[0] if all_logits else x[0, -1:]
        logits = self.lm_head(head_in).float()
        return logits, {i: hidden[self.layer_index(i)][0] for i in hidden_layers} if hidden_layers else {}

    def static_step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    tree: TreeRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed-shape step for CUDA-graph capture: attends over the whole capacity, masked by position.

        Returns float32 logits and the final normed hidden state (the LM head's input, layer -1).
        With ``use_kernels`` (CUDA), the Triton kernels run the layers and attend only the live positions.
        ``tree`` (kernels only): a draft tree's rows, written at ``positions``, computed at their virtual
        positions over their own paths, each bit for bit as the causal step computes that token there.
        """
        if tree is not None and self._kernels is None:
            raise ValueError("a tree step needs the Triton kernels (use_kernels)")
        if self._kernels is not None and embeds.shape[0] == 1 and positions.dim() == 1:
            x = self._fused_step(embeds, positions, cache, tree)
            return self._linear(self.lm_head, x, step=True).float(), x
        x, _ = self.run_layers(embeds, positions, cache.capacity, cache, set())
        return self.lm_head(x[0]).float(), x[0]

    def layer_index(self, i: int) -> int:
        """Hidden-layer index as stored: 0 embeddings, i layer i, -1 (and num_layers) the final normed state."""
        n = self.shape.num_layers
        idx = i + n + 1 if i < 0 else i
        if not 0 <= idx <= n:
            raise ValueError(f"hidden layer {i} is out of range for a decoder of {n} layers")
        return idx


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def graph_replay_ms(graph: torch.cuda.CUDAGraph, device: torch.device, repeats: int = 50) -> float:
    """GPU milliseconds of one replay of ``graph`` (CUDA events around ``repeats`` replays after one untimed)."""
    with torch.cuda.device(device):
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / repeats


def capture_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on a side stream, then capture it as a CUDA graph on ``device``; (graph, outputs).

    Runs with ``device`` as the current device, so models on a second GPU capture on their own GPU
    whatever device the calling thread has current. Replay with ``device`` current as well. The
    capture only restricts the calling thread (``thread_local``), so a model may capture while another
    thread runs the other model (parallel prefill); ``CAPTURE_LOCK`` keeps captures one at a time and
    keeps every device-wide ``common.timing.sync`` out of them (``torch.cuda.graph`` itself
    synchronizes the device before it begins, which fails while another thread is capturing).
    """
    with CAPTURE_LOCK, torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's default capture stream is created once, on whichever GPU came first
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
            outputs = fn()
    return graph, outputs


class CudaGraphDecoder:
    """Replays captured CUDA graphs of the k-token step (decode: k=1, verify: k=gamma+1) over one cache.

    The cache's capacity is fixed (it must not grow while graphs exist). A step of k tokens runs
    the smallest captured size >= k, padding the rest: padded positions lie past the cache's
    length, so they are never attended to and are overwritten by later steps.
    """

    def __init__(self, runner: LlamaRunner, cache: KVCache, sizes: Sequence[int], compile: bool = False,
                 step_fn: Callable[..., Any] | None = None):
        """``step_fn(embeds, positions, cache, tree=None)`` is the captured step (default ``runner.static_step``);
        it returns (logits, final hidden) or one tensor (e.g. logits and a feature layer side by side)."""
        if cache.keys.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA cache")
        self.runner, self.cache = runner, cache
        self.compiled = bool(compile)
        base = step_fn if step_fn is not None else runner.static_step
        # torch.compile fuses the many small element-wise kernels (norms, rotary, residuals)
        # that dominate a batch-1 step once launches are gone; the graph then replays its kernels.
        self._step_fn = torch.compile(base, dynamic=False) if compile else base
        self.sizes = sorted(set(int(k) for k in sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # tree graphs (``step_tree``), captured on first use: graph, outputs, embeds, positions, TreeRows
        self._tree_graphs: dict[int, tuple[Any, Any, torch.Tensor, torch.Tensor, TreeRows]] = {}
        self._key_ptr = cache.keys.data_ptr()
        self.last_hidden: torch.Tensor | None = None  # final normed hidden states of the last step

    def size_for(self, k: int) -> int | None:
        """The captured size that serves k tokens at the cache's current length, or None (run eagerly)."""
        for size in self.sizes:
            if size >= k and self.cache.length + size <= self.cache.capacity:
                return size
        return None

    def _capture(self, size: int):
        cache, hidden = self.cache, self.runner.shape.hidden_size
        device = cache.keys.device
        embeds = torch.zeros((1, size, hidden), dtype=cache.keys.dtype, device=device)
        # capture writes at the end of the capacity, never over live positions
        positions = torch.arange(cache.capacity - size, cache.capacity, device=device)
        self._graphs[size] = (*capture_graph(lambda: self._step_fn(embeds, positions, cache), device),
                              embeds, positions)

    @property
    def tree_sizes(self) -> list[int]:
        """The row counts of the tree graphs captured so far (``step_tree``)."""
        return sorted(self._tree_graphs)

    def capture_tree(self, size: int) -> None:
        """Capture the ``size``-row tree graph now (keeps capture cost out of timed regions)."""
        if size not in self._tree_graphs:
            self._capture_tree(size)

    def _capture_tree(self, size: int) -> None:
        cache, hidden = self.cache, self.runner.shape.hidden_size
        device = cache.keys.device
        embeds = torch.zeros((1, size, hidden), dtype=cache.keys.dtype, device=device)
        positions = torch.arange(cache.capacity - size, cache.capacity, device=device)
        tree = TreeRows(positions.clone(), positions.repeat(size, 1))  # the identity map: a causal step
        self._tree_graphs[size] = (*capture_graph(lambda: self._step_fn(embeds, positions, cache, tree), device),
                                   embeds, positions, tree)

    def capture_all(self) -> None:
        """Capture every size now (keeps capture cost out of timed regions)."""
        for size in self.sizes:
            if size not in self._graphs:
                self._capture(size)

    def replay_ms(self, size: int, repeats: int = 50) -> float:
        """GPU milliseconds of one replay of the ``size``-token graph (CUDA events; no host work counted).

        Replays write at the cache's end positions, past its live length, so the cache is unharmed.
        """
        if size not in self._graphs:
            self._capture(size)
        graph, _, _, positions = self._graphs[size]
        capacity = self.cache.capacity
        positions.copy_(torch.arange(capacity - size, capacity, device=positions.device))
        return graph_replay_ms(graph, positions.device, repeats)

    def step_fixed(self, embeds: torch.Tensor, size: int) -> torch.Tensor:
        """Run k tokens as consecutive padded steps of exactly ``size`` tokens.

        Every token then goes through the same kernels whatever k is (bf16 GEMM and attention
        kernels are shape dependent, so a 1-token and a 6-token forward can disagree in the last
        bits and flip a near-tie argmax). Rows are computed independently, so a token's logits
        do not depend on where in a step it sits: decoding and verification agree bitwise.
        """
        logits, hidden = [], []
        for i in range(0, embeds.shape[0], size):
            logits.append(self.step(embeds[i:i + size], size=size))
            hidden.append(self.last_hidden)
        self.last_hidden = None if any(h is None for h in hidden) else torch.cat(hidden)
        return torch.cat(logits)

    def step(self, embeds: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Append k token embeddings (k, H) and return float32 logits (k, V) by graph replay."""
        if self.cache.keys.data_ptr() != self._key_ptr:
            raise RuntimeError("the KV cache was reallocated after graph capture")
        k = embeds.shape[0]
        if size is None:
            size = self.size_for(k)
        elif k > size or self.cache.length + size > self.cache.capacity:
            size = None
        if size is None:
            raise ValueError(f"no captured size serves {k} tokens at length {self.cache.length}")
        if size not in self._graphs:
            self._capture(size)
        return self._replay(self._graphs[size][:4], embeds)

    def step_tree(self, embeds: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
        """k draft-tree rows (k <= ``size``) in one replay of the ``size``-row tree graph; float32 logits (k, V).

        Row i is written at the cache's length + i and computed at ``positions[i]`` over the fed rows
        ``rows[i]`` ((k, k), ``common.tree.tree_row_map``): bit for bit what a ``size``-row causal step
        computes for that token at that position (the runner's ``static_step`` with ``TreeRows``).
        """
        if self.cache.keys.data_ptr() != self._key_ptr:
            raise RuntimeError("the KV cache was reallocated after graph capture")
        k, start = embeds.shape[0], self.cache.length
        if k > size or start + size > self.cache.capacity:
            raise ValueError(f"a tree step of {size} rows does not serve {k} rows at length {start}")
        if size not in self._tree_graphs:
            self._capture_tree(size)
        graph, outputs, embeds_buf, positions_buf, tree = self._tree_graphs[size]
        ident = torch.arange(start, start + size, device=positions_buf.device)
        tree.positions.copy_(ident)
        tree.positions[:k].copy_(positions)
        tree.slots.copy_(ident.expand(size, size))
        tree.slots[:k, :k].copy_(rows + start)
        return self._replay((graph, outputs, embeds_buf, positions_buf), embeds)

    def _replay(self, entry: tuple[Any, Any, torch.Tensor, torch.Tensor], embeds: torch.Tensor) -> torch.Tensor:
        """Fill a captured step's inputs (rows written from the cache's length on), replay, advance the cache."""
        graph, outputs, embeds_buf, positions_buf = entry
        # a custom step function may return one tensor instead of (logits, final hidden)
        logits_buf, hidden_buf = outputs if isinstance(outputs, tuple) else (outputs, None)
        k, size, start = embeds.shape[0], embeds_buf.shape[1], self.cache.length
        embeds_buf.zero_()
        embeds_buf[0, :k].copy_(embeds)
        positions_buf.copy_(torch.arange(start, start + size, device=positions_buf.device))
        with torch.cuda.device(positions_buf.device):
            graph.replay()
        self.cache.length = start + k
        self.last_hidden = hidden_buf[:k].clone() if hidden_buf is not None else None
        return logits_buf[:k].clone()
