"""Adapters from EventGPT hidden states to Video-LLaVA hidden states (levels L1-L5).

All levels map draft states ``x`` (B, T, H_in) to target states (B, T, H_out), row t to row t
(the state just before target token t); the target's own LM head turns a mapped state into
a draft token. Sequence levels are causal: row t only sees rows <= t, which is all a drafter
has when it proposes token t.

- L1 ``bottleneck``: LayerNorm, down to 256, GELU, up, plus a residual (identity, or a linear
  map when H_in != H_out).
- L2 ``multi_bottleneck``: three stacked bottlenecks.
- L3 ``wide_bottleneck``: one bottleneck 1024 wide.
- L4 ``attention``: input projection, causal self-attention + FFN blocks, output projection,
  residual.
- L5 ``eagle``: EAGLE-style. An L1 ``align`` head maps row t to the target's state at t; a
  causal transformer with learned positions reads (feature_t, token_t) pairs and predicts
  the target's state at t + 1. Trained on both; :meth:`EagleAdapter.speculative_decode`
  drafts autoregressively in feature space (feature -> target LM head -> token -> next
  feature) without running the draft model for the later tokens.

Bottleneck widths scale down for tiny hidden sizes: ``min(width, max(16, min(H_in, H_out) // 2))``
(``min(H_in, H_out)`` for L3), so the 7B shapes get 256 / 1024 and a 64-wide test model 32 / 64.

Checkpoints are safetensors files whose metadata carries the adapter config (and any ``meta``
such as the layers it maps), so :func:`load_any_adapter` rebuilds the adapter from the file alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from common.drafters.config import strict_from_dict
from common.drafters.draft_graphs import HeadChain, StaticKV
from common.models.checkpoint import safetensors_header
from common.results import atomic_write

LEVELS = {1: "bottleneck", 2: "multi_bottleneck", 3: "wide_bottleneck", 4: "attention", 5: "eagle"}
CHECKPOINT_NAMES = ("best.safetensors", "last.safetensors")

__all__ = ["LEVELS", "AdapterConfig", "Bottleneck", "BottleneckAdapter", "MultiBottleneckAdapter",
           "AttentionAdapter", "EagleAdapter", "WidenedAdapter", "create_adapter", "save_adapter", "load_any_adapter",
           "read_adapter_meta", "scaled_width", "masked_logits", "BaseAdapter", "resolve_config", "count_parameters",
           "L5Trunk"]


def scaled_width(requested: int, hidden_in: int, hidden_out: int, wide: bool = False) -> int:
    """Bottleneck width for these hidden sizes: the requested width, shrunk for tiny models."""
    smallest = min(hidden_in, hidden_out)
    return int(min(requested, max(16, smallest if wide else smallest // 2)))


def _heads(d_model: int, requested: int) -> int:
    """The largest head count <= requested that divides ``d_model``."""
    for h in range(max(1, min(requested, d_model)), 0, -1):
        if d_model % h == 0:
            return h
    return 1


def masked_logits(hidden: torch.Tensor, lm_head: torch.Tensor | Callable, vocab_limit: int | None = None,
                  ) -> torch.Tensor:
    """float32 logits of ``hidden`` through ``lm_head`` (a (V, H) weight or a module); ids >= limit -> -inf."""
    if isinstance(lm_head, torch.Tensor):
        logits = hidden.to(lm_head.dtype) @ lm_head.t()
    else:
        weight = getattr(lm_head, "weight", None)
        logits = lm_head(hidden.to(weight.dtype) if isinstance(weight, torch.Tensor) else hidden)
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[..., vocab_limit:] = float("-inf")
    return logits


@dataclass
class AdapterConfig:
    """Everything that builds an adapter; stored in every checkpoint."""

    level: int
    hidden_in: int
    hidden_out: int
    bottleneck: int = 256
    num_blocks: int = 1
    d_model: int = 0
    num_layers: int = 1
    num_heads: int = 8
    ffn_dim: int = 0
    dropout: float = 0.0
    max_positions: int = 2048
    vocab_size: int = 0
    token_dim: int = 0
    widened_in: int = 0  # > 0: run on a widened twin (common.drafters.widen): its draft hidden size ...
    widened_out: int = 0  # ... and target hidden size; the adapter reads/writes their first hidden_in/out dims

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        return strict_from_dict(cls, d, "adapter")


class Bottleneck(nn.Module):
    """LayerNorm -> Linear(down) -> GELU -> Linear(up), plus a residual (identity or linear if sizes differ).

    The up projection starts at zero, so a fresh bottleneck is its residual path.
    """

    def __init__(self, d_in: int, d_out: int, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.down = nn.Linear(d_in, width)
        self.up = nn.Linear(width, d_out)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.up(self.drop(F.gelu(self.down(self.norm(x)))))


class Block(nn.Module):
    """Pre-norm causal self-attention + FFN (GELU), both residual."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # right-padded batches: with a causal mask a valid row never sees a padded one
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def cached(self, z: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for k new rows z (k, d) at ``positions`` over a static cache (heads, capacity,
        head_dim): their keys/values are written there, ``mask`` (k, capacity) says what each row sees."""
        k, d = z.shape
        q, key, value = self.qkv(self.norm1(z)).view(k, 3, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)
        keys.index_copy_(1, positions, key.to(keys.dtype))
        values.index_copy_(1, positions, value.to(values.dtype))
        attn = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        z = z + self.drop(self.proj(attn.transpose(0, 1).reshape(k, d)))
        return z + self.drop(self.ffn(self.norm2(z)))


class BaseAdapter(nn.Module):
    """Common surface: ``forward(x, tokens=None) -> (aligned, next_or_None)``."""

    causal_sequence = False  # True: row t depends on rows < t too (the drafter passes the history)
    predicts_next = False

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config

    @property
    def level(self) -> int:
        return self.config.level

    @property
    def io_sizes(self) -> tuple[int, int]:
        """(draft, target) hidden sizes it reads and writes: the twin's when widened."""
        c = self.config
        return (c.widened_in or c.hidden_in, c.widened_out or c.hidden_out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BottleneckAdapter(BaseAdapter):
    """L1 (and L3 with a wide bottleneck): one residual bottleneck per position."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.block = Bottleneck(config.hidden_in, config.hidden_out, config.bottleneck, config.dropout)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):  # noqa: ARG002
        return self.block(x), None


class MultiBottleneckAdapter(BaseAdapter):
    """L2: ``num_blocks`` stacked residual bottlenecks (the first maps H_in -> H_out)."""

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        c = config
        self.blocks = nn.ModuleList(
            [Bottleneck(c.hidden_in if i == 0 else c.hidden_out, c.hidden_out, c.bottleneck, c.dropout)
             for i in range(c.num_blocks)])

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):  # noqa: ARG002
        for block in self.blocks:
            x = block(x)
        return x, None


class AttentionAdapter(BaseAdapter):
    """L4: LayerNorm + projection to d_model, causal attention + FFN blocks, projection back, residual."""

    causal_sequence = True

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        c = config
        self.norm_in = nn.LayerNorm(c.hidden_in)
        self.proj_in = nn.Linear(c.hidden_in, c.d_model)
        self.blocks = nn.ModuleList([Block(c.d_model, c.num_heads, c.ffn_dim, c.dropout) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(c.d_model)
        self.proj_out = nn.Linear(c.d_model, c.hidden_out)
        self.skip = nn.Identity() if c.hidden_in == c.hidden_out else nn.Linear(c.hidden_in, c.hidden_out, bias=False)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):  # noqa: ARG002
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
        z = self.proj_in(self.norm_in(x))
        for block in self.blocks:
            z = block(z)
        out = self.skip(x) + self.proj_out(self.norm_out(z))
        return (out[0] if squeeze else out), None


class EagleAdapter(BaseAdapter):
    """L5: align row t to the target's state at t, and predict the target's state at t + 1.

    ``forward(x, tokens)``: ``aligned = align(x)``; the trunk reads ``fc([aligned_t ; emb(token_t)])``
    plus a learned position embedding through causal blocks and returns ``next_t``, the
    predicted target state at t + 1 (``aligned_t`` + a residual update). ``token_t`` is the
    target token at position t (teacher-forced in training, the drafted token when drafting).
    """

    causal_sequence = True
    predicts_next = True

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        c = config
        if c.vocab_size <= 0:
            raise ValueError("the L5 (eagle) adapter needs vocab_size (the target vocabulary) for its token embedding")
        self.align = Bottleneck(c.hidden_in, c.hidden_out, c.bottleneck, c.dropout)
        self.embed = nn.Embedding(c.vocab_size, c.token_dim)
        self.fc = nn.Linear(c.hidden_out + c.token_dim, c.d_model)
        self.pos = nn.Embedding(c.max_positions, c.d_model)
        self.blocks = nn.ModuleList([Block(c.d_model, c.num_heads, c.ffn_dim, c.dropout) for _ in range(c.num_layers)])
        self.norm = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, c.hidden_out)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._chains: dict[tuple, Any] = {}  # draft_chain's static caches and CUDA graphs

    def draft_chain(self, lm_head: torch.Tensor | Callable, vocab_limit: int | None, capacity: int = 2048,
                    commit_size: int = 6, graphs: bool = False) -> Any:
        """The trunk's static chain (:class:`common.drafters.draft_graphs.HeadChain` over :class:`L5Trunk`):
        made once per LM head and configuration and shared by the drafters of this adapter."""
        p = self.fc.weight
        key = (id(lm_head), vocab_limit, int(capacity), int(commit_size), bool(graphs), p.device, p.dtype)
        chain = self._chains.get(key)
        if chain is None or not chain.valid():
            chain = self._chains[key] = HeadChain(L5Trunk(self, lm_head, vocab_limit), capacity, commit_size, graphs)
        return chain

    def next_features(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, H_out) target-space features + (B, T) tokens -> predicted features of rows t + 1."""
        t = features.shape[1]
        positions = torch.arange(t, device=features.device).clamp_max(self.config.max_positions - 1)
        tokens = tokens.clamp(0, self.config.vocab_size - 1)
        z = self.fc(torch.cat([features, self.embed(tokens).to(features.dtype)], dim=-1)) + self.pos(positions)
        for block in self.blocks:
            z = block(z)
        return features + self.out(self.norm(z))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(0)
            tokens = None if tokens is None else tokens.unsqueeze(0)
        aligned = self.align(x)
        nxt = None if tokens is None else self.next_features(aligned, tokens)
        if squeeze:
            return aligned[0], None if nxt is None else nxt[0]
        return aligned, nxt

    @torch.no_grad()
    def speculative_decode(self, draft_states: torch.Tensor, context: list[int], lm_head: torch.Tensor | Callable,
                           gamma: int, vocab_limit: int | None = None, stop_token_ids: frozenset[int] = frozenset(),
                           ) -> list[int]:
        """Draft ``gamma`` tokens after ``context`` in feature space.

        ``draft_states`` (T, H_in) are the draft model's states for rows 0..T-1 with
        T = len(context) + 1 (row t precedes context token t; the last row precedes the first
        new token). Token 1 comes from the aligned last row; each further token from the
        trunk's next-feature prediction, fed back with the token just drafted.
        """
        if draft_states.shape[0] != len(context) + 1:
            raise ValueError(f"need len(context) + 1 = {len(context) + 1} draft states, got {draft_states.shape[0]}")
        if gamma <= 0:
            return []
        dtype = next(self.parameters()).dtype
        features = self.align(draft_states.to(dtype))  # (T, H_out)
        token = int(masked_logits(features[-1], lm_head, vocab_limit).argmax())
        out = [token]
        tokens = list(context) + [token]
        while len(out) < gamma and token not in stop_token_ids:
            ids = torch.tensor(tokens, dtype=torch.long, device=features.device)
            nxt = self.next_features(features.unsqueeze(0), ids.unsqueeze(0))[0, -1]
            token = int(masked_logits(nxt, lm_head, vocab_limit).argmax())
            out.append(token)
            features = torch.cat([features, nxt.unsqueeze(0)])
            tokens.append(token)
        return out


class L5Trunk:
    """The L5 adapter's next-feature trunk bound to the target's LM head, at fixed shapes with a KV cache.

    The head of :class:`common.drafters.draft_graphs.HeadChain` (duck-typed like the EAGLE head):
    ``static_step(features, ids, positions, keys, values)`` is :meth:`EagleAdapter.next_features` for
    new rows at ``positions`` over cached earlier rows, ``logits`` the target's LM head (ids >= the
    vocabulary limit masked). Get it through :meth:`EagleAdapter.draft_chain`.
    """

    def __init__(self, adapter: EagleAdapter, lm_head: torch.Tensor | Callable, vocab_limit: int | None):
        self.adapter, self.lm_head, self.vocab_limit = adapter, lm_head, vocab_limit
        self.fc = adapter.fc  # its weight's device and dtype are the chain buffers'
        self.feature_size = adapter.config.hidden_out

    def new_cache(self, capacity: int) -> Any:
        c, p = self.adapter.config, self.fc.weight
        heads = self.adapter.blocks[0].num_heads if len(self.adapter.blocks) else 1
        return StaticKV(max(len(self.adapter.blocks), 1), heads, capacity, c.d_model // heads, p.dtype, p.device)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        return masked_logits(feature, self.lm_head, self.vocab_limit)

    def static_step(self, features: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(k, H_out) features + (k,) tokens at ``positions`` -> (k, H_out) predicted next features."""
        a, c = self.adapter, self.adapter.config
        features = features.to(self.fc.weight.dtype)
        tokens = ids.clamp(0, c.vocab_size - 1)
        z = a.fc(torch.cat([features, a.embed(tokens).to(features.dtype)], dim=-1))
        z = z + a.pos(positions.clamp_max(c.max_positions - 1))
        mask = torch.arange(keys.shape[2], device=positions.device)[None, :] <= positions[:, None]
        for layer, block in enumerate(a.blocks):
            z = block.cached(z, positions, keys[layer], values[layer], mask)
        return features + a.out(a.norm(z))


class _PaddedLmHead:
    """The twin's LM head applied to a small feature (zero-padded to the twin's hidden size first)."""

    def __init__(self, lm_head: torch.Tensor | Callable, size: int):
        self.lm_head, self.size = lm_head, size

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return masked_logits(F.pad(hidden, (0, self.size - hidden.shape[-1])), self.lm_head)


class WidenedAdapter(BaseAdapter):
    """A small pair's adapter on its widened twin: reads the first ``hidden_in`` dims of the twin's
    draft states (the small draft's states, exactly) and writes the small target state into the first
    ``hidden_out`` dims (zeros elsewhere, as in the twin's own states). Saved as the inner adapter."""

    def __init__(self, inner: BaseAdapter):
        super().__init__(inner.config)
        self.inner = inner
        self.causal_sequence, self.predicts_next = inner.causal_sequence, inner.predicts_next

    def _pad(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else F.pad(y, (0, self.config.widened_out - y.shape[-1]))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None):
        aligned, nxt = self.inner(x[..., : self.config.hidden_in], tokens)
        return self._pad(aligned), self._pad(nxt)

    @torch.no_grad()
    def speculative_decode(self, draft_states: torch.Tensor, context: list[int], lm_head: torch.Tensor | Callable,
                           gamma: int, vocab_limit: int | None = None, stop_token_ids: frozenset[int] = frozenset(),
                           ) -> list[int]:
        """The L5 inner adapter's drafting, on the small dims, through the twin's LM head."""
        return self.inner.speculative_decode(draft_states[..., : self.config.hidden_in], context,
                                             _PaddedLmHead(lm_head, self.config.widened_out), gamma, vocab_limit,
                                             stop_token_ids)


_CLASSES = {1: BottleneckAdapter, 2: MultiBottleneckAdapter, 3: BottleneckAdapter, 4: AttentionAdapter,
            5: EagleAdapter}


def resolve_config(level: int, hidden_in: int, hidden_out: int, **kw: Any) -> AdapterConfig:
    """Fill level defaults (scaled widths, d_model, heads, FFN) into a full config."""
    if level not in LEVELS:
        raise ValueError(f"adapter level must be one of {sorted(LEVELS)}, got {level!r}")
    kw = {k: v for k, v in kw.items() if v is not None}
    explicit_width = "bottleneck" in kw
    c = AdapterConfig(level=int(level), hidden_in=int(hidden_in), hidden_out=int(hidden_out), **kw)
    if level == 3 and not explicit_width:
        c.bottleneck = scaled_width(1024, hidden_in, hidden_out, wide=True)
    elif not explicit_width:
        c.bottleneck = scaled_width(c.bottleneck, hidden_in, hidden_out)
    if level == 2 and "num_blocks" not in kw:
        c.num_blocks = 3
    if level in (4, 5):
        if not c.d_model:
            c.d_model = hidden_out if level == 5 else min(hidden_in, 1024)
        c.num_heads = _heads(c.d_model, c.num_heads)
        if not c.ffn_dim:
            c.ffn_dim = 2 * c.d_model
    if level == 5 and not c.token_dim:
        c.token_dim = min(256, hidden_out)
    return c


def create_adapter(level: int, hidden_in: int, hidden_out: int, **kw: Any) -> BaseAdapter:
    """Build an adapter of ``level`` (1-5); ``kw`` overrides :class:`AdapterConfig` fields (None = default)."""
    config = resolve_config(level, hidden_in, hidden_out, **kw)
    return _CLASSES[config.level](config)


def save_adapter(adapter: BaseAdapter, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` as safetensors with its config and ``meta`` in the metadata (atomic)."""
    if isinstance(adapter, WidenedAdapter):  # the on-disk format is the small adapter's (config says widened)
        adapter = adapter.inner
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    metadata = {"adapter_config": json.dumps(adapter.config.to_dict()), "meta": json.dumps(meta or {}),
                "format": "hidden_adapter_v1"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {' or '.join(CHECKPOINT_NAMES)}; train an adapter into it first")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter checkpoint not found")
    return path


def read_adapter_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, meta dict) of a checkpoint file (or a folder holding best/last.safetensors)."""
    file = _checkpoint_file(path)
    md = safetensors_header(file, "train or save the adapter again")[1]  # one line for a corrupt file
    if "adapter_config" not in md:
        raise ValueError(f"{file}: not a hidden adapter checkpoint (no adapter_config in its metadata)")
    return json.loads(md["adapter_config"]), json.loads(md.get("meta", "{}"))


def load_any_adapter(path: str | Path, device: str | torch.device = "cpu") -> BaseAdapter:
    """Rebuild any level's adapter from its checkpoint (file, or folder with best/last.safetensors)."""
    from safetensors.torch import load_file

    file = _checkpoint_file(path)
    config, meta = read_adapter_meta(file)
    adapter = _CLASSES[int(config["level"])](AdapterConfig.from_dict(config))
    adapter.load_state_dict(load_file(str(file)), strict=True)
    if adapter.config.widened_in or adapter.config.widened_out:
        adapter = WidenedAdapter(adapter)
    adapter.meta = meta
    adapter.checkpoint_path = str(file)
    return adapter.to(device).eval()


def count_parameters(adapter: nn.Module) -> int:
    return sum(p.numel() for p in adapter.parameters())
