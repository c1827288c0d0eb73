"""Graphed draft chains: an EAGLE head's commit and its whole gamma-step chain as one CUDA-graph replay each.

Eagerly, a proposal of gamma tokens costs one launch-bound head step per token plus a host read
per token (``int(argmax)``). :class:`HeadChain` runs the same math at fixed shapes over a static
head cache, so each part replays as one CUDA graph:

- ``commit(features, tokens)``: the accepted context's true target rows, padded to
  ``commit_size`` rows (longer inputs run as consecutive padded steps). Padded rows sit at
  positions past the real ones, so no real row attends them, and later rows overwrite them.
- ``chain(root, gamma)``: :func:`draft_chain` unrolled, argmax on the device, each drafted
  token and predicted feature fed back at temporary positions after the cache's length (the
  length does not move: they are dropped). The host reads the gamma tokens once.

Every input is a static buffer filled before the replay (features, ids, positions, the root
feature, the start position). With ``graphs=False`` the same functions run eagerly on the same
buffers (the CPU path and the reference the CUDA graphs must equal bitwise). Captures warm up on a
side stream and hold ``common.timing.CAPTURE_LOCK`` (:func:`common.models.decoder.capture_graph`);
their warm-up writes at the end of the capacity, never over live positions.

The head is duck-typed: ``static_step``, ``logits``, ``new_cache``, ``feature_size`` and ``fc`` (its
weight's device and dtype are the buffers'), so the same graphs serve the EAGLE head
(``common.drafters.eagle_head.EagleHead``) and the L5 adapter's trunk
(``common.drafters.hidden_adapter.L5Trunk``); this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.models.decoder import capture_graph

__all__ = ["HeadChain", "StaticKV", "draft_chain", "CHAIN_MODES", "pick_chain_mode", "plain_weights",
           "cut_after_stop"]

CHAIN_MODES = ("auto", "eager", "static", "graph")


def plain_weights(*modules: Any) -> bool:
    """Whether every module is a floating-point tensor, ``nn.Linear`` or ``nn.Embedding`` (safe to graph;
    quantized layers are not); a twin's ``VocabLimitedHead`` counts as the ``nn.Linear`` it wraps."""
    from common.models.decoder import VocabLimitedHead

    modules = tuple(m.head if isinstance(m, VocabLimitedHead) else m for m in modules)
    return all(isinstance(m, (torch.Tensor, torch.nn.Linear, torch.nn.Embedding)) and
               (m if isinstance(m, torch.Tensor) else m.weight).is_floating_point() for m in modules)


def pick_chain_mode(mode: str, on_cuda: bool, graphable: bool) -> str:
    """A drafter's chain mode: ``eager`` (its own eager steps: the reference), ``static`` (the fixed-shape
    chain run eagerly), ``graph`` (that chain as CUDA graphs); ``auto`` is graph when ``on_cuda`` and
    ``graphable`` (plain weights and a model that decodes with CUDA graphs), else eager."""
    if mode not in CHAIN_MODES:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_MODES)}, got {mode!r}")
    if mode == "graph" and not on_cuda:
        raise ValueError("chain='graph' needs the drafter on a CUDA device (use 'static' or 'eager' on CPU)")
    if mode != "auto":
        return mode
    return "graph" if on_cuda and graphable else "eager"


def cut_after_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (what an eager chain would have drafted)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


class StaticKV:
    """Keys and values (layers, heads, capacity, head_dim) and a filled ``length``; never grows."""

    def __init__(self, layers: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.keys = torch.zeros((layers, heads, capacity, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


def draft_chain(head: Any, root: torch.Tensor, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                gamma: int) -> torch.Tensor:
    """``gamma`` greedy draft tokens (gamma,) from the ``root`` feature (H,), fixed shapes, no host reads.

    Token i is the argmax of the LM head on feature i; feature i + 1 is the head's step on
    (feature i, token i) at position ``start + i`` (``start`` a (1,) device tensor) of ``keys``/``values``.
    """
    feature = root.reshape(1, -1)
    tokens = []
    for i in range(gamma):
        token = head.logits(feature[0]).argmax(dim=-1, keepdim=True)
        tokens.append(token)
        if i < gamma - 1:
            feature = head.static_step(feature, token, start + i, keys, values)
    return torch.cat(tokens)


class HeadChain:
    """A head's static cache, input buffers and (with ``graphs``) the CUDA graphs of its commit and chain.

    ``capacity`` head positions are fixed (the cache never grows: check :meth:`fits` first); ``owner``
    says which drafter's context the cache holds (drafters sharing one head take it over in turn).
    """

    def __init__(self, head: Any, capacity: int, commit_size: int, graphs: bool):
        if graphs and head.fc.weight.device.type != "cuda":
            raise ValueError("CUDA graphs of the draft chain need the head on a CUDA device")
        self.head = head
        self.cache = head.new_cache(int(capacity))
        self.commit_size = max(int(commit_size), 1)
        self.graphs = bool(graphs)
        self.owner: object | None = None
        p = head.fc.weight
        self.device = p.device
        hidden = int(head.feature_size)
        self._feats = torch.zeros((self.commit_size, hidden), dtype=p.dtype, device=p.device)
        self._index = torch.zeros(2 * self.commit_size, dtype=torch.long, device=p.device)  # [ids | positions]
        self._root = torch.zeros(hidden, dtype=p.dtype, device=p.device)
        self._start = torch.zeros(1, dtype=torch.long, device=p.device)
        self._commit_graph: tuple[Any, torch.Tensor] | None = None
        self._chain_graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._key_ptr = self.cache.keys.data_ptr()

    @property
    def capacity(self) -> int:
        return int(self.cache.keys.shape[2])

    def valid(self) -> bool:
        """False once someone grew the cache (its graphs would read freed memory)."""
        return self.cache.keys.data_ptr() == self._key_ptr

    def fits(self, rows: int) -> bool:
        """Whether ``rows`` more positions fit after the cache's length (and the cache is still the captured one)."""
        return self.valid() and self.cache.length + max(int(rows), 0) <= self.capacity

    def claim(self, owner: object) -> None:
        """Hand the cache to ``owner`` (emptied)."""
        self.owner = owner
        self.cache.truncate(0)

    def step(self, feature: torch.Tensor, token: int) -> torch.Tensor:
        """One row at the cache's end, eagerly, with the chain's kernels (the root path for context tokens
        the target has not verified yet); returns the (H,) next feature."""
        if not self.fits(1):
            raise ValueError(f"the static head cache is full ({self.capacity} positions); check fits() first")
        position = torch.tensor([self.cache.length], device=self.device)
        ids = torch.tensor([int(token)], device=self.device)
        out = self.head.static_step(feature.reshape(1, -1), ids, position, self.cache.keys, self.cache.values)
        self.cache.length += 1
        return out[0]

    # ----- the captured functions (they read only the static buffers) -----
    def _commit_fn(self) -> torch.Tensor:
        size = self.commit_size
        return self.head.static_step(self._feats, self._index[:size], self._index[size:], self.cache.keys,
                                     self.cache.values)

    def _chain_fn(self, gamma: int) -> Callable[[], torch.Tensor]:
        return lambda: draft_chain(self.head, self._root, self._start, self.cache.keys, self.cache.values, gamma)

    def _capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return fn()

        return capture_graph(run, self.device, warmup=2)

    # ----- commit -----
    def commit(self, features: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Append k rows ((k, H) true features, k tokens) at the cache's end; (k, H) head outputs (a copy)."""
        tokens = [int(t) for t in tokens]
        size = self.commit_size
        if not self.fits(size * -(-len(tokens) // size)):  # the last step's padded rows must fit too
            raise ValueError(f"{len(tokens)} rows do not fit the static head cache ({self.cache.length} of "
                             f"{self.capacity} positions used); check fits() first")
        outs = [self._commit_chunk(features[i:i + size], tokens[i:i + size]) for i in range(0, len(tokens), size)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _commit_chunk(self, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        k, start = len(tokens), self.cache.length
        self._ensure_commit_graph()
        self._prepare(start, tokens, features)
        if self.graphs:
            graph, out = self._commit_graph
            with torch.cuda.device(self.device):
                graph.replay()
        else:
            out = self._commit_fn()
        self.cache.length = start + k
        return out[:k].clone()

    def _prepare(self, start: int, tokens: list[int], features: torch.Tensor | None = None) -> None:
        """Fill the commit buffers with k rows at ``start``; padded rows are zero features, id 0, the next positions."""
        size, k = self.commit_size, len(tokens)
        if k < size:
            self._feats.zero_()
        if k:
            self._feats[:k].copy_(features.reshape(k, -1))
        host = torch.tensor(tokens + [0] * (size - k) + list(range(start, start + size)), dtype=torch.long)
        self._index.copy_(host)  # one host-to-device copy: ids and positions

    def _ensure_commit_graph(self) -> None:
        if self.graphs and self._commit_graph is None:
            self._prepare(self.capacity - self.commit_size, [])  # the capture's warm-up writes at the end
            self._commit_graph = self._capture(self._commit_fn)

    # ----- chain -----
    def chain(self, root: torch.Tensor, gamma: int) -> list[int]:
        """``gamma`` greedy tokens from ``root`` (H,), fed back at temporary positions; the length is unchanged."""
        gamma = int(gamma)
        if gamma <= 0:
            return []
        size = self._chain_size(gamma)
        if not self.fits(size - 1):
            raise ValueError(f"a chain of {gamma} tokens does not fit the static head cache ({self.cache.length} of "
                             f"{self.capacity} positions used); check fits() first")
        self._root.copy_(root.reshape(-1))
        self._start.fill_(self.cache.length)
        if self.graphs:
            graph, out = self._chain_graphs[size]
            with torch.cuda.device(self.device):
                graph.replay()
        else:
            out = self._chain_fn(gamma)()
        return out[:gamma].tolist()  # the one host read of the proposal

    def _chain_size(self, gamma: int) -> int:
        """The chain length to run: eagerly gamma; graphed the smallest captured >= gamma (captured if none)."""
        if not self.graphs:
            return gamma
        fitting = [s for s in self._chain_graphs if s >= gamma and self.fits(s - 1)]
        if fitting:
            return min(fitting)
        if not self.fits(gamma - 1):
            return gamma  # chain() refuses it
        self._start.fill_(self.capacity - gamma + 1)  # the capture's warm-up writes at the end of the capacity
        self._chain_graphs[gamma] = self._capture(self._chain_fn(gamma))
        return gamma

    def replay_ms(self, gamma: int, repeats: int = 50) -> dict[str, float]:
        """GPU ms of one commit replay and one ``gamma`` chain replay (CUDA events; graphs only).

        Replays run at the cache's end positions, past its live length, so the cache is unharmed.
        """
        from common.models.decoder import graph_replay_ms

        if not self.graphs:
            raise ValueError("replay_ms needs graphs=True")
        size = self._chain_size(gamma)
        self._ensure_commit_graph()
        self._prepare(self.capacity - self.commit_size, [])
        self._start.fill_(self.capacity - size + 1)
        return {"commit_ms": graph_replay_ms(self._commit_graph[0], self.device, repeats),
                "chain_ms": graph_replay_ms(self._chain_graphs[size][0], self.device, repeats)}
