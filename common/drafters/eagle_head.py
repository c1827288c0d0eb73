"""Same-modality baseline: an EAGLE-style draft head over Video-LLaVA's own features.

The head is one LLaMA-style decoder layer (RMSNorm, causal self-attention with rotary
positions, SwiGLU MLP) reading, at answer position t, ``fc([f_t ; e(x_t)])``: the target's
feature ``f_t`` (its final normed state, layer -1, the state that feeds the LM head; or any
stored layer) concatenated with the target's own embedding of the token ``x_t`` that state
predicts. It outputs the predicted feature ``f_{t+1}``; the target's FROZEN LM head turns it
into the next draft token, which is embedded and fed back (chain drafting).

Row convention (as the extraction stores them): row 0 is the target's state at the last
prompt position, row t the state just before answer token t (``x_t`` = argmax of the LM
head on row t for the target's greedy answer).

Checkpoints hold only the head: ``config.json`` + ``model.safetensors``. The LM head and
embedding table are the target's and are bound at load time (:meth:`EagleHead.bind`), never
copied into the checkpoint.

Drafting needs the target's features of the accepted context. :class:`EagleTarget` wraps the
target VLM: every prefill/forward through it also returns the feature layer and stores it
per position (the engine's verify forward provides the features for free), ``truncate``
drops them. Pass the wrapper, not the bare target, to ``prefill_sample`` /
``speculative_generate`` / ``run_parallel``; make ONE wrapper per generation (it is a thin
proxy: no weights are copied; CUDA graphs that also return the features are captured once
per target and reused). :class:`EagleDrafter` implements the engine's ``Drafter`` protocol.

    head = load_eagle_head("results/feature_alignment/eagle_head/best", target)     # bound to the target
    proxy = EagleTarget(target, head.config.feature_layer)
    state = prefill_sample(proxy, sample).state
    drafter = make_eagle_drafter(head, None, proxy, state)
    result = speculative_generate(proxy, state, drafter, max_new_tokens=50, gamma=5)

Lossless by construction: the target verifies every proposal.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from common.drafters.config import strict_from_dict
from common.drafters.draft_graphs import (
    CHAIN_MODES,
    HeadChain,
    cut_after_stop,
    pick_chain_mode,
    plain_weights,
)
from common.models.decoder import CudaGraphDecoder, apply_rope, rms_norm
from common.models.decoding import Decoding, replay, replay_tree, route_of
from common.results import atomic_write, atomic_write_text
from common.speculative import DraftProposal, SyncedDrafter
from common.timing import sync_current_stream
from common.tree import DraftTree, TreeConfig, build_tree
from common.vlm import DecodeState

__all__ = [
    "EagleHeadConfig", "EagleHead", "HeadCache", "EagleTarget", "EagleDrafter", "make_eagle_drafter",
    "save_eagle_head", "load_eagle_head", "resolve_head_dir", "read_target_embeddings", "CONFIG_NAME",
    "WEIGHTS_NAME", "FORMAT", "head_config_from_checkpoint", "CHAIN_CAPACITY", "CHAIN_MODES", "resolve_chain_mode",
    "eager_tree",
]

CHAIN_CAPACITY = 2048  # head positions of an EagleDrafter's static chain (answers longer than that draft eagerly)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "eagle_head_v1"


# ----------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------

@dataclass
class EagleHeadConfig:
    """Everything that builds a head (stored as the checkpoint's config.json)."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    feature_layer: int = -1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    target_vocab_size: int = 0  # rows of the LM head it was trained against (checked at bind; 0 = unknown)
    target_num_layers: int = 0
    format: str = FORMAT
    extra: dict = field(default_factory=dict)  # provenance (training data, metrics); not used by the model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EagleHeadConfig:
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not an EAGLE head config (format {d.get('format')!r}, expected {FORMAT!r})")
        return strict_from_dict(cls, d, "eagle head")

    @classmethod
    def for_target(cls, target: Any, feature_layer: int = -1, num_heads: int | None = None,
                   intermediate_size: int | None = None, **kw: Any) -> EagleHeadConfig:
        """A config shaped like one decoder layer of ``target`` (a VLM behind the uniform interface)."""
        lm_config = target.runner.language_model.config
        return cls(hidden_size=int(target.hidden_size),
                   num_heads=int(num_heads or lm_config.num_attention_heads),
                   intermediate_size=int(intermediate_size or lm_config.intermediate_size),
                   feature_layer=int(feature_layer),
                   rms_norm_eps=float(getattr(lm_config, "rms_norm_eps", 1e-6)),
                   target_vocab_size=int(target.vocab_size), target_num_layers=int(target.num_layers), **kw)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm with a learned scale (the math is :func:`common.models.decoder.rms_norm`)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadCache:
    """The head's own keys/values (batch 1): ``length`` positions, rolled back by ``truncate``."""

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int = 64):
        self.keys = torch.zeros((1, num_heads, capacity, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def ensure(self, needed: int) -> None:
        if needed <= self.keys.shape[2]:
            return
        cap = max(needed, 2 * self.keys.shape[2])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], cap, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a head cache of {self.length} positions to {length}")
        self.length = length


class EagleHead(nn.Module):
    """fc([feature ; token embedding]) -> one decoder layer -> predicted next feature.

    ``forward(features, token_embeds)``: (B, T, H) each, right-padded batches welcome (causal
    attention: a valid row never sees a padded one); returns (B, T, H) predicted features of
    rows t + 1. :meth:`step` runs new positions over a :class:`HeadCache` (drafting).
    """

    def __init__(self, config: EagleHeadConfig):
        super().__init__()
        c = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        self.config = c
        h = c.hidden_size
        self.head_dim = h // c.num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary positions")
        self.fc = nn.Linear(2 * h, h)
        self.input_norm = RMSNorm(h, c.rms_norm_eps)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.post_norm = RMSNorm(h, c.rms_norm_eps)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # the target's frozen modules, bound by bind(); a plain tuple, so never in state_dict()
        self._target_modules: tuple[Any, Any] | None = None
        self.vocab_limit: int | None = None
        self._chains: dict[tuple, HeadChain] = {}  # static caches + CUDA graphs of the draft chain (draft_chain)

    # ----- binding to the target's frozen LM head and embeddings -----
    def bind(self, target: Any = None, *, lm_head: Any = None, embed_tokens: Any = None,
             vocab_limit: int | None = None) -> EagleHead:
        """Use ``target``'s LM head and token embeddings (or the given modules / (V, H) weights)."""
        if target is not None:
            if int(target.hidden_size) != self.config.hidden_size:
                raise ValueError(f"the head is {self.config.hidden_size} wide but the target's hidden size is "
                                 f"{target.hidden_size}: it was trained for another model")
            vocab = int(target.vocab_size)
            if self.config.target_vocab_size and vocab != self.config.target_vocab_size:
                raise ValueError(f"the head was trained against a {self.config.target_vocab_size}-row LM head, "
                                 f"this target has {vocab}: it was trained for another model")
            lm_head, embed_tokens = target.lm_head, target.embed_tokens
            vocab_limit = int(target.base_vocab_size) if vocab_limit is None else vocab_limit
        if lm_head is None or embed_tokens is None:
            raise ValueError("bind needs a target or both lm_head and embed_tokens")
        self._target_modules = (lm_head, embed_tokens)
        self.vocab_limit = None if vocab_limit is None else int(vocab_limit)
        return self

    @property
    def feature_size(self) -> int:
        """Width of the features it reads and predicts (the target's hidden size)."""
        return self.config.hidden_size

    @property
    def bound(self) -> bool:
        return self._target_modules is not None

    def _modules_bound(self) -> tuple[Any, Any]:
        if self._target_modules is None:
            raise RuntimeError("the EAGLE head is not bound to a target: call head.bind(target) "
                               "(load_eagle_head(path, target) does it)")
        return self._target_modules

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's embeddings of ``ids`` in the head's dtype."""
        _, embed = self._modules_bound()
        dtype = self.fc.weight.dtype
        if isinstance(embed, torch.Tensor):
            return embed[ids.to(embed.device)].to(self.fc.weight.device, dtype)
        return embed(ids.to(embed.weight.device)).to(self.fc.weight.device, dtype)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """float32 logits of the target's LM head on ``feature`` (ids >= vocab_limit masked to -inf)."""
        lm_head, _ = self._modules_bound()
        if isinstance(lm_head, torch.Tensor):
            out = feature.to(lm_head.device, lm_head.dtype) @ lm_head.t()
        else:
            weight = getattr(lm_head, "weight", None)
            dev = weight.device if isinstance(weight, torch.Tensor) else feature.device
            dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
            x = feature.to(dev) if dtype is None else feature.to(dev, dtype)
            out = lm_head(x)
        out = out.float()
        if self.vocab_limit is not None and self.vocab_limit < out.shape[-1]:
            out[..., self.vocab_limit:] = float("-inf")
        return out

    # ----- the layer -----
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values (B, heads, T, head_dim) of the layer's input x (B, T, H)."""
        b, t, _ = x.shape
        n = self.config.num_heads
        hs = self.input_norm(x)
        q = self.q_proj(hs).view(b, t, n, self.head_dim).transpose(1, 2)
        k = self.k_proj(hs).view(b, t, n, self.head_dim).transpose(1, 2)
        v = self.v_proj(hs).view(b, t, n, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(positions, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _residual_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The attention output's projection and the MLP, both residual; attn (B, heads, T, head_dim)."""
        b, t, h = x.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, h))
        hs = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(hs)) * self.up_proj(hs))

    def _layer(self, x: torch.Tensor, positions: torch.Tensor, cache: HeadCache | None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self._qkv(x, positions)
        if cache is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.ensure(start + t)
            cache.keys[:, :, start:start + t] = k.to(cache.keys.dtype)
            cache.values[:, :, start:start + t] = v.to(cache.values.dtype)
            cache.length = start + t
            keys, values = cache.keys[:, :, : start + t], cache.values[:, :, : start + t]
            mask = torch.arange(start + t, device=x.device)[None, :] <= positions[:, None]
            mask = mask if attn_mask is None else attn_mask  # a draft tree's own mask (common.tree)
            attn = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return self._residual_mlp(x, attn)

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, H) features + (B, T, H) embeddings of the tokens they predict -> (B, T, H) next features."""
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([features.to(dtype), token_embeds.to(dtype)], dim=-1))
        positions = torch.arange(x.shape[1], device=x.device)
        return self._layer(x, positions, None)

    def new_cache(self, capacity: int = 64) -> HeadCache:
        p = self.fc.weight
        return HeadCache(self.config.num_heads, self.head_dim, p.dtype, p.device, capacity)

    def step(self, features: torch.Tensor, token_ids: Sequence[int] | torch.Tensor, cache: HeadCache,
             positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append k positions ((k, H) features, k tokens) at the cache's end; returns (k, H) next features.

        ``positions`` (k,) rotary positions and ``attn_mask`` (k, length + k) are for tree drafting.
        """
        p = self.fc.weight
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        x = self.fc(torch.cat([features.to(p.device, p.dtype).reshape(-1, self.config.hidden_size),
                               self.embed(ids)], dim=-1)).unsqueeze(0)
        if positions is None:
            positions = torch.arange(cache.length, cache.length + x.shape[1], device=p.device)
        return self._layer(x, positions.to(p.device), cache,
                           None if attn_mask is None else attn_mask.to(p.device))[0]

    def static_step(self, features: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None = None,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A fixed-shape :meth:`step` for CUDA-graph capture: every input a device tensor, no host reads.

        ``features`` (k, H), ``ids`` (k,) and rotary ``positions`` (k,) of k new rows; their keys and values
        are written at ``slots`` (default: ``positions``) into ``keys``/``values`` (1, heads, capacity,
        head_dim), and every row attends the whole capacity masked by ``attn_mask`` (k, capacity) (default:
        the slots <= its position; a draft tree passes its ancestors). Returns (k, H) next features.
        """
        p = self.fc.weight
        x = self.fc(torch.cat([features.to(p.dtype), self.embed(ids)], dim=-1)).unsqueeze(0)
        q, k, v = self._qkv(x, positions)
        slots = positions if slots is None else slots
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        mask = attn_mask
        if mask is None:
            mask = torch.arange(keys.shape[2], device=positions.device)[None, :] <= positions[:, None]
        attn = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return self._residual_mlp(x, attn)[0]

    def draft_chain(self, capacity: int = CHAIN_CAPACITY, commit_size: int = 6, graphs: bool = False) -> HeadChain:
        """The head's static chain (:class:`common.drafters.draft_graphs.HeadChain`): a fixed-capacity cache,
        its buffers and, with ``graphs``, the CUDA graphs of its commit and chain; made once per
        configuration (device, dtype and binding included) and shared by the drafters of this head."""
        p = self.fc.weight
        key = (int(capacity), int(commit_size), bool(graphs), p.device, p.dtype, *map(id, self._modules_bound()))
        chain = self._chains.get(key)
        if chain is None or not chain.valid():
            chain = self._chains[key] = HeadChain(self, capacity, commit_size, graphs)
        return chain

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def save_eagle_head(head: EagleHead, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` (the head's own weights only) and ``folder/config.json``."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(head.config.to_dict(), indent=2) + "\n")
    return folder


def resolve_head_dir(path: str | Path) -> Path:
    """The checkpoint folder: ``path`` itself, or its ``best/`` (a training output folder)."""
    path = Path(path)
    for folder in (path, path / "best"):
        if (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(f"{path}: no EAGLE head checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}, or best/ with them); "
                            "train one with python -m feature_alignment.train_eagle_head")


def load_eagle_head(path: str | Path, target: Any = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> EagleHead:
    """Rebuild a head from its checkpoint; bound to ``target`` (its device and compute dtype) when given."""
    folder = resolve_head_dir(path)
    config = EagleHeadConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    head = EagleHead(config)
    state = load_file(str(folder / WEIGHTS_NAME))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the head (missing {missing}, unexpected {unexpected})")
    if device is None:
        device = target.device if target is not None else "cpu"
    if dtype is None:
        dtype = target.dtype if target is not None else torch.float32
    head = head.to(device=device, dtype=dtype).eval()
    head.checkpoint_path = str(folder)
    if target is not None:
        head.bind(target)
    return head


def read_target_embeddings(checkpoint: str | Path) -> torch.Tensor:
    """The LLM's input embedding table (V, H) read from a Video-LLaVA checkpoint folder, without loading the model."""
    from safetensors import safe_open

    folder = Path(checkpoint)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    candidates: list[tuple[str, Path]] = []
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        candidates = [(k, folder / f) for k, f in weight_map.items()]
    else:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                candidates += [(k, f) for k in st.keys()]
    keys = [(k, f) for k, f in candidates if k.endswith("embed_tokens.weight") and "tower" not in k]
    if not keys:
        raise FileNotFoundError(f"{folder}: no *embed_tokens.weight in its safetensors; pass --videollava_path "
                                "pointing to the target checkpoint the features were extracted with")
    key, file = sorted(keys, key=lambda kf: ("language_model" not in kf[0], kf[0]))[0]
    with safe_open(str(file), framework="pt") as st:
        return st.get_tensor(key)


# ----------------------------------------------------------------------------------------
# The target wrapper that records features
# ----------------------------------------------------------------------------------------

class _FeatureBuffer:
    """Target features of rows 0..length-1 (row j = state at absolute position prompt_length - 1 + j)."""

    def __init__(self, first: torch.Tensor, prompt_length: int):
        self.prompt_length = prompt_length
        self.rows = first.reshape(1, -1).new_zeros((128, first.shape[-1]))
        self.rows[0] = first.reshape(-1)
        self.length = 1

    def append(self, start_position: int, rows: torch.Tensor) -> None:
        index = start_position - self.prompt_length + 1  # row index of the first new state
        if index != self.length:  # never happens through EagleTarget; be safe rather than wrong
            self.length = min(self.length, max(index, 0))
            if index != self.length:
                return
        need = self.length + rows.shape[0]
        if need > self.rows.shape[0]:
            new = self.rows.new_zeros((max(need, 2 * self.rows.shape[0]), self.rows.shape[1]))
            new[: self.length] = self.rows[: self.length]
            self.rows = new
        self.rows[self.length:need] = rows.to(self.rows.dtype)
        self.length = need

    def truncate(self, cache_length: int) -> None:
        self.length = max(0, min(self.length, cache_length - self.prompt_length + 1))

    def view(self) -> torch.Tensor:
        return self.rows[: self.length]


# CUDA graphs of the target step that also return the feature layer, per target graphs (the object, not its
# id: a new CudaGraphDecoder can reuse a freed one's id, and stale graphs replay over a cache no longer in use)
_FEATURE_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def feature_step(runner: Any, layer: int) -> Callable[..., torch.Tensor]:
    """A fixed-shape graph step returning [float32 logits | feature of ``layer``] per row.

    For the final layer it is the runner's own ``static_step`` (Triton kernels included), so a
    target verified through it computes bit for bit what its own graph decode computes.
    """
    n = runner.shape.num_layers
    idx = runner.layer_index(layer)

    def step(embeds: torch.Tensor, positions: torch.Tensor, cache: Any, tree: Any = None) -> torch.Tensor:
        if idx == n:  # a draft tree's rows (``TreeRows``) too, on the Triton kernels
            logits, feature = runner.static_step(embeds, positions, cache, tree)
            return torch.cat([logits, feature.float()], dim=-1)
        if tree is not None:
            raise ValueError(f"tree graph steps record the final layer only, not layer {layer}")
        x, hidden = runner.run_layers(embeds, positions, cache.capacity, cache, {idx})
        return torch.cat([runner.lm_head(x[0]).float(), hidden[idx][0].float()], dim=-1)

    return step


def _feature_graphs(target: Any, layer: int):
    """A ``CudaGraphDecoder`` over the target's static cache whose step returns [logits | feature]."""
    graphs = target.decoding.graphs
    per_layer = _FEATURE_GRAPHS.setdefault(graphs, {})
    if layer in per_layer:
        return per_layer[layer]
    runner = target.runner
    decoder = CudaGraphDecoder(runner, graphs.cache, graphs.sizes, compile=graphs.compiled,
                               step_fn=feature_step(runner, layer))
    decoder.capture_all()
    for size in graphs.tree_sizes:  # the target's tree verifies, with the feature
        decoder.capture_tree(size)
    per_layer[layer] = decoder
    return decoder


class EagleTarget:
    """The target VLM, recording its feature layer per position on every prefill/forward.

    The rest of the uniform interface (encode, tokenizer, vocab sizes, ...) is the target's, delegated
    one name at a time (nothing else of the target is reachable through it). With CUDA graphs on
    the target, forwards replay graphs of the same step that also return the feature (for the final
    layer the target's own ``static_step``, Triton kernels included, so the logits are the target's
    own graph decode's bit for bit; an intermediate layer runs the stock kernels); fixed-step
    numerics (``use_fixed_step``) are honoured. ``layer=None`` records nothing (only tracks the
    latest state, for the hybrid's switch).

    ``last_state`` is published only once the prefill's device work is done (``sync``, default: wait
    for the calling thread's current stream), because another thread on another stream reads it at
    once (``run_parallel``'s draft lane: the hybrid switches to the EAGLE head there and reads row 0).
    """

    def __init__(self, target: Any, layer: int | None = -1, *, sync: Callable[[], None] | None = None):
        self.target = target
        self.layer = None if layer is None else int(layer)
        self._sync = sync if sync is not None else (lambda: sync_current_stream(target.device))
        self.last_state: DecodeState | None = None
        self._buffers: dict[int, tuple[weakref.ref, _FeatureBuffer]] = {}

    # ----- the rest of the uniform interface: the target's own -----
    @property
    def name(self) -> str:
        return self.target.name

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def dtype(self) -> torch.dtype:
        return self.target.dtype

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    @property
    def base_vocab_size(self) -> int:
        return self.target.base_vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.target.eos_token_id

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    @property
    def num_layers(self) -> int:
        return self.target.num_layers

    @property
    def lm_head(self) -> nn.Module:
        return self.target.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.target.embed_tokens

    @property
    def graphs(self) -> Any:
        return self.target.graphs

    @property
    def fixed_step(self) -> int | None:
        return self.target.fixed_step

    @property
    def decoding(self) -> Decoding:
        return self.target.decoding

    def load_visual(self, sample: Any) -> Any:
        return self.target.load_visual(sample)

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self.target.preprocess(raw)

    def encode_pixels(self, pixels: torch.Tensor) -> Any:
        return self.target.encode_pixels(pixels)

    def encode(self, sample: Any) -> Any:
        return self.target.encode(sample)

    def build_prompt(self, question: str) -> str:
        return self.target.build_prompt(question)

    def prompt_embeds(self, visual: Any, question: str) -> torch.Tensor:
        return self.target.prompt_embeds(visual, question)

    def prompt_ids(self, question: str, *args: Any) -> list[int]:
        return self.target.prompt_ids(question, *args)

    def tokenize(self, text: str) -> list[int]:
        return self.target.tokenize(text)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.target.decode_text(token_ids)

    def __repr__(self) -> str:
        return f"EagleTarget({self.target.name}, layer={self.layer})"

    # ----- features -----
    def features(self, state: DecodeState) -> torch.Tensor | None:
        """(rows, H) recorded features of ``state`` (row 0 = last prompt position), or None."""
        entry = self._buffers.get(id(state))
        if entry is None or entry[0]() is not state:
            return None
        return entry[1].view()

    def _buffer(self, state: DecodeState) -> _FeatureBuffer | None:
        entry = self._buffers.get(id(state))
        return entry[1] if entry is not None and entry[0]() is state else None

    # ----- the uniform interface -----
    @torch.no_grad()
    def prefill(self, visual: Any, question: str, hidden_layers: Sequence[int] = ()) -> DecodeState:
        """The target's own prefill, also keeping the last row's feature."""
        t = self.target
        asked = list(hidden_layers)
        want = asked + ([self.layer] if self.layer is not None and self.layer not in asked else [])
        state = t.prefill(visual, question, hidden_layers=want)  # the target's own prefill numerics
        hidden = state.hidden
        state.hidden = {k: hidden[k] for k in asked}
        if self.layer is not None:
            self._buffers = {k: v for k, v in self._buffers.items() if v[0]() is not None}
            self._buffers[id(state)] = (weakref.ref(state), _FeatureBuffer(hidden[self.layer][-1], state.prompt_length))
        self._sync()  # the state and its row 0 are complete before any other stream may read them
        self.last_state = state
        return state

    @torch.no_grad()
    def forward(self, state: DecodeState, token_ids: Sequence[int] | torch.Tensor,
                hidden_layers: Sequence[int] = (), **tree: Any) -> torch.Tensor:
        """The target's forward; the fed positions' features are recorded for ``state``.

        ``tree``: ``attn_mask`` / ``position_ids`` of a draft tree's verify (see :meth:`compact`); graphed
        like the target's own tree verify when the feature is the final layer, else eager.
        """
        t = self.target
        buffer = self._buffer(state) if self.layer is not None else None
        if buffer is None:
            return t.forward(state, token_ids, hidden_layers, **tree)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=t.device).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("forward needs at least one token")
        start = state.length
        graphs = t.decoding.graphs
        if (graphs is not None and not hidden_layers and state.cache is graphs.cache
                and (not tree or t.runner.layer_index(self.layer) == t.runner.shape.num_layers)):
            logits = self._graph_forward(state, ids, tree)
            if logits is not None:
                return logits
        asked = list(hidden_layers)
        logits = t.forward(state, ids, asked + ([self.layer] if self.layer not in asked else []), **tree)
        buffer.append(start, state.hidden[self.layer])
        state.hidden = {k: state.hidden[k] for k in asked}
        return logits

    def _graph_forward(self, state: DecodeState, ids: torch.Tensor, tree: dict[str, Any]) -> torch.Tensor | None:
        t = self.target
        decoder = _feature_graphs(t, self.layer)
        embeds = t.embed_tokens(ids)
        start = state.length
        fixed = t.decoding.fixed_step
        out = (replay(decoder, embeds, fixed) if tree.get("attn_mask") is None
               else replay_tree(decoder, embeds, tree["attn_mask"], tree.get("position_ids"), fixed))
        if out is None:
            return None
        t.decoding.count_route(route_of(decoder, ids.numel(), fixed, tree.get("attn_mask"), None, replayed=True))
        vocab = int(t.vocab_size)
        logits, feature = out[:, :vocab], out[:, vocab:]
        state.logits = logits[-1]
        state.hidden = {}
        self._buffer(state).append(start, feature.to(t.dtype))
        return logits

    def truncate(self, state: DecodeState, length: int) -> None:
        self.target.truncate(state, length)
        buffer = self._buffer(state) if self.layer is not None else None
        if buffer is not None:
            buffer.truncate(length)

    # ----- draft trees (common.tree) -----
    def compact(self, state: DecodeState, start: int, keep: Sequence[int]) -> None:
        """The target's KV compaction after a tree verify; the recorded features follow the same path."""
        self.target.compact(state, start, keep)
        buffer = self._buffer(state) if self.layer is not None else None
        if buffer is not None:
            first = start - buffer.prompt_length + 1  # row of position ``start``
            src = torch.tensor([first + int(k) for k in keep], dtype=torch.long, device=buffer.rows.device)
            buffer.rows[first:first + len(keep)] = buffer.rows[src]
            buffer.length = first + len(keep)


# ----------------------------------------------------------------------------------------
# The drafter
# ----------------------------------------------------------------------------------------

class EagleDrafter(SyncedDrafter):
    """Chain drafting with an EAGLE head over the target's recorded features (Drafter protocol).

    On :meth:`propose` with context ``c_0..c_{n-1}`` (the target has processed all but the last
    one): the head's cache is kept for the longest prefix it computed from TRUE target features,
    the newly known rows ``(f_j, c_j)`` are fed in one head step (committed), then ``gamma`` tokens
    are drafted: token = argmax LM head(predicted feature), fed back with the predicted feature
    (temporary positions, dropped afterwards). When the target has already processed every
    context token (right after prefill), the first draft token comes from its true feature.
    The committed positions are synced by :class:`common.speculative.SyncedDrafter` (rows: the
    head's output at each committed position).

    ``target`` must be the :class:`EagleTarget` the engine verifies with; ``target_state`` its
    state (default: the wrapper's latest prefilled state, read at each proposal; while there is
    none, e.g. during ``run_parallel``'s free window, it proposes nothing). ``stats``
    counts head steps (``steps``), ``seconds`` (device-synchronised when ``sync`` is given),
    proposals, tokens proposed and committed positions.

    ``chain`` (:func:`resolve_chain_mode`): ``graph`` commits and drafts on the head's shared static
    chain (:class:`common.drafters.draft_graphs.HeadChain`: one CUDA-graph replay for the commit, one
    for the whole gamma-token chain, one host read), the default on CUDA when the target decodes
    with CUDA graphs; ``static`` runs that chain eagerly (its reference); ``eager`` the head step by
    step over a growing cache (the default elsewhere). Past ``chain_capacity`` head positions the
    drafter continues eagerly. Trees (:meth:`propose_tree`) follow the same mode: on the chain each depth is
    one fixed-shape k-row expansion (one CUDA-graph replay in graph mode, one host read), else eager head steps.
    """

    def __init__(self, head: EagleHead, target: EagleTarget, target_state: DecodeState | None = None, *,
                 stop_token_ids: Iterable[int] | None = None, name: str = "eagle", sync: Any = None,
                 clock: Any = time.perf_counter, chain: str = "auto", chain_capacity: int = CHAIN_CAPACITY):
        if not isinstance(target, EagleTarget):
            raise TypeError("EagleDrafter needs the EagleTarget wrapper that the engine verifies with "
                            "(proxy = EagleTarget(target, head.config.feature_layer); prefill and "
                            "speculative_generate through proxy), not the bare target model")
        if target.layer != head.config.feature_layer:
            raise ValueError(f"the wrapper records layer {target.layer}, the head reads layer {head.config.feature_layer}")
        super().__init__(None, name=name, sync=sync, clock=clock, committed_positions=0)
        if not head.bound:  # loaded without a target: move to the target's device and compute dtype, bind
            head.to(device=target.device, dtype=target.dtype)
            head.bind(target.target)
        self.head = head.eval()
        self.target = target
        self._state = target_state
        stops = [target.eos_token_id] if stop_token_ids is None else stop_token_ids
        self.stop_token_ids = frozenset(int(t) for t in stops)
        self._cache = head.new_cache()
        self._feats: torch.Tensor | None = None  # the target's true features while drafting
        self._bound_state: DecodeState | None = None
        self.chain_mode = resolve_chain_mode(chain, head, target)
        self._chain_capacity = int(chain_capacity)
        self._chain: HeadChain | None = None  # attached at the first verified proposal (commit size gamma + 1)
        self._owner = object()  # which drafter's context a shared chain cache holds

    # ----- the static chain (common.drafters.draft_graphs) -----
    def _attach_chain(self, commit_size: int, verified: bool) -> None:
        """Draft on the head's shared static chain (``chain_mode`` static or graph) from the first proposal whose
        whole context the target has ``verified``: a proposal before that (the hybrid's switch inside
        ``run_parallel``'s free window, one token at a time) runs eagerly, so the chain's commit size is the
        engine's gamma + 1, as a plain EAGLE run's. The rows fed eagerly are recommitted (``_keep_chain``)."""
        if self.chain_mode == "eager" or self._chain is not None or not verified:
            return
        self._chain = self.head.draft_chain(self._chain_capacity, commit_size, graphs=self.chain_mode == "graph")
        self._cache = self._chain.cache

    def _keep_chain(self, room: int) -> None:
        """Own the chain's cache; leave the chain (eager from now on) when ``room`` more rows would not fit."""
        chain = self._chain
        if chain is None:
            return
        if chain.owner is not self._owner:  # another drafter of this head used the cache: start over
            chain.claim(self._owner)
            self._rollback(0)
        if chain.valid() and chain.fits(room):
            return
        old, self._chain, self.chain_mode = self._cache, None, "eager"
        self._cache = self.head.new_cache(2 * old.keys.shape[2])
        self._cache.keys[:, :, :old.length] = old.keys[:, :, :old.length]
        self._cache.values[:, :, :old.length] = old.values[:, :, :old.length]
        self._cache.length = old.length

    def _forward(self, tokens: list[int]) -> list[torch.Tensor]:
        start = len(self._fed)
        feats = self._feats[start:start + len(tokens)]
        if self._chain is not None:
            out = self._chain.commit(feats, tokens)
        else:
            out = self.head.step(feats, tokens, self._cache)
        self.stats["committed_positions"] += len(tokens)
        return list(out)

    def _truncate(self, keep: int) -> None:
        self._cache.truncate(keep)

    def _step(self, feature: torch.Tensor, token: int) -> torch.Tensor:
        """One temporary head position (a predicted feature); returns its output."""
        self.stats.steps += 1
        if self._chain is not None:
            return self._chain.step(feature, token)
        return self.head.step(feature.unsqueeze(0), [token], self._cache)[-1]

    def _token(self, feature: torch.Tensor) -> int:
        return int(self.head.logits(feature).argmax())

    @torch.no_grad()
    def _draft(self, context: list[int], gamma: int) -> DraftProposal:
        """Draft up to ``gamma`` tokens after ``context`` (stopping after a stop token)."""
        synced = self._sync_context(context, gamma + 1)
        if synced is None:  # the target is still prefilling (e.g. run_parallel's free window): nothing to read yet
            return DraftProposal([], None)
        committed = self._cache.length
        try:
            feature = self._root_feature(context, *synced)
            if self._chain is not None:  # one replay; the host reads the gamma tokens once
                out_tokens = cut_after_stop(self._chain.chain(feature, gamma), self.stop_token_ids)
                self.stats.steps += len(out_tokens) - 1  # counted as the eager chain runs them
                return DraftProposal(out_tokens, None)
            out_tokens: list[int] = []
            for i in range(gamma):
                token = self._token(feature)
                out_tokens.append(token)
                if token in self.stop_token_ids or i == gamma - 1:
                    break
                feature = self._step(feature, token)
            return DraftProposal(out_tokens, None)
        finally:
            self._cache.truncate(committed)

    def _sync_context(self, context: list[int], commit_size: int, extra: int = 0) -> tuple[torch.Tensor, int] | None:
        """Commit the context's true target features to the head cache; (features, usable rows) or None.
        ``extra``: temporary head rows the proposal needs beyond a chain of ``commit_size`` (a tree's)."""
        state = self._state if self._state is not None else self.target.last_state
        if state is None:
            return None
        feats = self.target.features(state)
        if feats is None or feats.shape[0] == 0:
            raise RuntimeError("the target state has no recorded features: it was not prefilled through this "
                               "EagleTarget wrapper")
        n = len(context)
        usable = min(n, int(feats.shape[0]))  # positions j < usable have a true feature and a known token
        self._attach_chain(commit_size, verified=usable == n)
        if self._chain is not None:  # the padded commit of the new rows, then a chain of up to commit_size tokens
            self._keep_chain(len(context) + self._chain.commit_size + commit_size + extra + 8)
        if state is not self._bound_state:
            self._bound_state = state
            self._rollback(0)
        self._feats = feats
        try:
            self.sync_to(context[:usable])  # SyncedDrafter: keep the common prefix, feed the new true rows
        finally:
            self._feats = None
        return feats, usable

    def _root_feature(self, context: list[int], feats: torch.Tensor, usable: int) -> torch.Tensor:
        """The feature predicting the first draft token (temporary head positions for unverified context)."""
        n = len(context)
        if feats.shape[0] > n:  # the target has processed the whole context: its true next feature
            return feats[n]
        feature = self._rows[-1] if usable > 0 else feats[0]
        for j in range(usable, n):  # context tokens without a true feature yet: predicted features
            feature = self._step(feature, context[j])
        return feature

    # ----- draft trees (common.tree) -----
    @torch.no_grad()
    def propose_tree(self, context: list[int], config: TreeConfig, max_depth: int) -> DraftTree:
        """An EAGLE-2 tree (``common.tree.build_tree``): each depth is one head step over the top-k frontier,
        on the static chain one fixed-shape k-row step (``HeadChain.tree``: a CUDA-graph replay in graph mode)."""
        start = self._now()
        tree = DraftTree()
        context = [int(t) for t in context]
        depth = min(config.max_depth, int(max_depth))
        synced = self._sync_context(context, depth + 1, extra=config.topk * depth) if depth > 0 else None
        if synced is not None:
            committed = self._cache.length
            try:
                root = self._root_feature(context, *synced)
                if self._chain is not None and self._chain.fits(self._chain.tree_rows(config, max_depth)):
                    tree, expansions = self._chain.tree(root, config, max_depth, self.stop_token_ids)
                    self.stats.steps += expansions  # counted as the eager tree runs them
                else:
                    tree = self._tree(root, config, max_depth)
            finally:
                self._cache.truncate(committed)
        self.stats.proposals += 1
        self.stats.tokens_proposed += len(tree)
        self.stats.seconds += self._now() - start
        return tree

    def _tree(self, root: torch.Tensor, config: TreeConfig, max_depth: int) -> DraftTree:
        tree, expansions = eager_tree(self.head, self._cache, root, config, max_depth, self.stop_token_ids)
        self.stats.steps += expansions
        return tree


def eager_tree(head: EagleHead, cache: HeadCache, root: torch.Tensor, config: TreeConfig, max_depth: int,
               stop_tokens: frozenset[int] = frozenset()) -> tuple[DraftTree, int]:
    """The reference EAGLE-2 tree from ``root`` (H,): one eager head step per depth over ``cache`` (its new rows
    are the caller's to drop); (tree, expansions run). ``HeadChain.tree`` is its fixed-shape twin."""
    base = cache.length  # the root's children sit at head position base (depth 1)
    slots: dict[int, int] = {}  # node -> head cache slot
    outputs: dict[int, torch.Tensor] = {-1: root}  # node -> head output (predicts its children)
    count = [0]

    def expand(tree: DraftTree, frontier: list[int]) -> torch.Tensor:
        first = cache.length
        device = root.device
        mask = torch.zeros((len(frontier), first + len(frontier)), dtype=torch.bool, device=device)
        mask[:, :base] = True
        depths = tree.depths
        for row, node in enumerate(frontier):
            slots[node] = first + row
            up = node
            while up >= 0:
                mask[row, slots[up]] = True
                up = tree.parents[up]
        positions = torch.tensor([base + depths[i] - 1 for i in frontier], device=device)
        feats = torch.stack([outputs[tree.parents[i]] for i in frontier])
        count[0] += 1
        out = head.step(feats, [tree.tokens[i] for i in frontier], cache, positions, mask)
        outputs.update(zip(frontier, out))
        return torch.log_softmax(head.logits(out), dim=-1)

    tree = build_tree(torch.log_softmax(head.logits(root), dim=-1), expand, config, max_depth=max_depth,
                      stop_tokens=stop_tokens)
    return tree, count[0]


def resolve_chain_mode(mode: str, head: EagleHead, target: Any) -> str:
    """How an :class:`EagleDrafter` drafts (:func:`common.drafters.draft_graphs.pick_chain_mode`): ``auto`` is
    graph when the head is on CUDA, the target decodes with CUDA graphs and its LM head and embeddings are
    plain weights, else eager."""
    plain = head.bound and plain_weights(*head._modules_bound())
    on_graphs = getattr(target, "graphs", None) is not None
    return pick_chain_mode(mode, head.fc.weight.device.type == "cuda", plain and on_graphs)


def make_eagle_drafter(head: EagleHead, draft_state_or_none: Any, target: Any, target_state: Any = None, *,
                       sync: Any = None, stop_token_ids: Iterable[int] | None = None, name: str = "eagle",
                       ) -> EagleDrafter:
    """An :class:`EagleDrafter` for one generation (``draft_state_or_none`` is unused: no draft model).

    ``target`` must be the :class:`EagleTarget` wrapper the engine verifies with (make one per
    generation: ``EagleTarget(vlm, head.config.feature_layer)``); ``target_state`` its prefilled
    state, or None to use the wrapper's latest prefill (e.g. when the drafter is built before the
    target's prefill finishes, as in ``run_parallel``).
    """
    del draft_state_or_none
    return EagleDrafter(head, target, target_state, sync=sync, stop_token_ids=stop_token_ids, name=name)


def head_config_from_checkpoint(videollava_path: str | Path, hidden_size: int, feature_layer: int,
                                target_vocab_size: int = 0, num_heads: int | None = None,
                                intermediate_size: int | None = None) -> EagleHeadConfig:
    """A head config shaped like one decoder layer of the Video-LLaVA checkpoint (read from its config.json)."""
    text: dict[str, Any] = {}
    config_file = Path(videollava_path) / "config.json"
    if config_file.is_file():
        text = json.loads(config_file.read_text()).get("text_config", {}) or {}
    heads = num_heads or int(text.get("num_attention_heads", 0)) or max(1, hidden_size // 128)
    if hidden_size % heads or (hidden_size // heads) % 2:
        heads = next(h for h in range(heads, 0, -1) if hidden_size % h == 0 and (hidden_size // h) % 2 == 0)
    inter = intermediate_size or int(text.get("intermediate_size", 0)) or int(math.ceil(8 * hidden_size / 3))
    return EagleHeadConfig(hidden_size=hidden_size, num_heads=heads, intermediate_size=inter,
                           feature_layer=feature_layer, rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                           target_vocab_size=int(target_vocab_size),
                           target_num_layers=int(text.get("num_hidden_layers", 0)))
