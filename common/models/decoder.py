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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
    """Preallocated keys and values of every layer, batch 1, growing by reallocation when full."""

    def __init__(self, shape: DecoderShape, capacity: int, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.num_layers, 1, shape.num_kv_heads, max(int(capacity), 1), shape.head_dim)
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

    def clone(self) -> KVCache:
        """An independent copy (for tests and branching)."""
        other = KVCache.__new__(KVCache)
        other.shape, other.length = self.shape, self.length
        other.keys, other.values = self.keys.clone(), self.values.clone()
        return other


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LlamaRunner:
    """Runs a transformers ``LlamaModel`` (layers, norm, rotary) plus an LM head over a ``KVCache``."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        self.language_model = language_model
        self.lm_head = lm_head
        self.shape = DecoderShape.from_config(language_model.config)
        self.layers = list(language_model.layers)[: self.shape.num_layers]

    def new_cache(self, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """An empty cache for ``capacity`` positions."""
        return KVCache(self.shape, capacity, dtype, device)

    def _attention(self, layer: nn.Module, x: torch.Tensor, cache: KVCache, layer_idx: int,
                   positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend_len: int,
                   mask: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        s = self.shape
        k_new = x.shape[1]
        q = attn.q_proj(x).view(1, k_new, s.num_heads, s.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, k_new, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, k_new, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        keys, values = cache.keys[layer_idx], cache.values[layer_idx]
        keys.index_copy_(2, positions, k.to(keys.dtype))
        values.index_copy_(2, positions, v.to(values.dtype))
        keys, values = keys[:, :, :attend_len], values[:, :, :attend_len]
        if s.num_kv_heads != s.num_heads:
            rep = s.num_heads // s.num_kv_heads
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return attn.o_proj(out.transpose(1, 2).reshape(1, k_new, s.num_heads * s.head_dim))

    def run(self, inputs_embeds: torch.Tensor, cache: KVCache, hidden_layers: Sequence[int] = (),
            attend_len: int | None = None, all_logits: bool = True,
            ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Append ``inputs_embeds`` (1, k, H) at the cache's end; return logits and chosen hidden states.

        Returns float32 logits (k, V) (only the last row, shape (1, V), when ``all_logits`` is
        False: a long prefill then skips the LM head on every prompt position) and a dict
        layer -> (k, H) hidden states for the requested ``hidden_layers``.
        """
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds.unsqueeze(0)
        k_new = inputs_embeds.shape[1]
        start = cache.length
        cache.ensure_capacity(start + k_new)
        device = inputs_embeds.device
        positions = torch.arange(start, start + k_new, device=device)
        attend = start + k_new if attend_len is None else attend_len
        key_pos = torch.arange(attend, device=device)
        mask = key_pos[None, :] <= positions[:, None]
        cos, sin = self.language_model.rotary_emb(inputs_embeds, positions[None, :])
        cos, sin = cos[:, None], sin[:, None]
        wanted = {self._layer_index(i) for i in hidden_layers}
        hidden: dict[int, torch.Tensor] = {}
        x = inputs_embeds
        if 0 in wanted:
            hidden[0] = x[0]
        for idx, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer, h, cache, idx, positions, cos, sin, attend, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if idx + 1 in wanted and idx + 1 != self.shape.num_layers:
                hidden[idx + 1] = x[0]
        x = self.language_model.norm(x)
        if self.shape.num_layers in wanted:
            hidden[self.shape.num_layers] = x[0]
        cache.length = start + k_new
        head_in = x[0] if all_logits else x[0, -1:]
        logits = self.lm_head(head_in).float()
        return logits, {i: hidden[self._layer_index(i)] for i in hidden_layers} if hidden_layers else {}

    def _layer_index(self, i: int) -> int:
        n = self.shape.num_layers
        idx = i + n + 1 if i < 0 else i
        if not 0 <= idx <= n:
            raise ValueError(f"hidden layer {i} is out of range for a decoder of {n} layers")
        return idx
