"""How one model runs its decode and verify steps: eagerly, or as CUDA-graph replays over a static KV cache.

``Decoding`` owns the captured graphs (``CudaGraphDecoder``), the fixed step, the Triton-kernels
switch of the runner and the batched greedy decoder; ``step`` is the public entry every forward of
a ``VisionLanguageModel`` goes through (``vlm.decoding``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from common.models.decoder import CudaGraphDecoder, KVCache, LlamaRunner
from common.models.greedy_batch import BatchedGreedyDecoder
from common.tree import tree_row_map


def replay(graphs: CudaGraphDecoder, embeds: torch.Tensor, fixed_step: int | None) -> torch.Tensor | None:
    """Run k token embeddings by graph replay: as padded ``fixed_step`` steps when they fit the cache, else
    the smallest captured size that serves k; None when no graph serves them (run eagerly)."""
    k = embeds.shape[0]
    if fixed_step and graphs.cache.length + fixed_step * -(-k // fixed_step) <= graphs.cache.capacity:
        return graphs.step_fixed(embeds, fixed_step)
    if graphs.size_for(k) is not None:
        return graphs.step(embeds)
    return None


def replay_tree(graphs: CudaGraphDecoder, embeds: torch.Tensor, attn_mask: torch.Tensor, position_ids: torch.Tensor,
                fixed_step: int | None) -> torch.Tensor | None:
    """A draft tree's verify (``common.tree``) as one tree-graph replay on the Triton kernels: of
    ``fixed_step`` rows when set (bitwise the fixed-step decode), else the smallest captured size that
    serves it; None when the kernels are off, no size serves it or the mask is no tree mask (run eagerly)."""
    k = embeds.shape[0]
    if tree_refusal(graphs, k, fixed_step, position_ids):
        return None
    positions = position_ids.reshape(-1)
    rows = tree_row_map(attn_mask, positions, graphs.cache.length)
    return None if rows is None else graphs.step_tree(embeds, positions, rows, fixed_step or graphs.size_for(k))


def tree_refusal(graphs: CudaGraphDecoder, k: int, fixed_step: int | None, position_ids: torch.Tensor | None) -> str | None:
    """Why no tree graph serves a k-row tree verify at the cache's length (a route name's suffix), or None."""
    if not graphs.runner.kernels_on:
        return "kernels_off"
    if position_ids is None:
        return "no_positions"
    size = fixed_step if fixed_step else graphs.size_for(k)
    if size is None or k > size:
        return "too_many_rows"
    if graphs.cache.length + size > graphs.cache.capacity:
        return "cache_full"
    return None


def route_of(graphs: CudaGraphDecoder | None, k: int, fixed_step: int | None, attn_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, replayed: bool) -> str:
    """The name a forward's route is counted under (``Decoding.routes``): ``graph`` or ``graph_tree`` when
    it replayed, else ``eager``, or ``eager_tree:<why>`` for a tree verify (``tree_refusal``; ``no_tree_mask``
    when ``tree_row_map`` refused the mask, ``no_graphs`` without graphs or for a foreign cache/layer)."""
    tree = attn_mask is not None
    if replayed:
        return "graph_tree" if tree else "graph"
    if not tree:
        return "eager"
    why = "no_graphs" if graphs is None else tree_refusal(graphs, k, fixed_step, position_ids)
    return f"eager_tree:{why or 'no_tree_mask'}"


@contextmanager
def counting_routes(model: Any) -> Iterator[Counter[str]]:
    """The forwards ``model`` (anything with a ``decoding``; others count nothing) runs inside the block,
    per route (``route_of``); the counter is filled when the block ends."""
    decoding = getattr(model, "decoding", None)
    before = Counter(decoding.routes) if isinstance(decoding, Decoding) else None
    counted: Counter[str] = Counter()
    try:
        yield counted
    finally:
        if before is not None:
            counted.update(decoding.routes - before)


class Decoding:
    """Decode routing of one model's LLM: eager steps, or CUDA graphs (+ fixed step, + kernels)."""

    def __init__(self, runner: LlamaRunner):
        self.runner = runner
        self.graphs: CudaGraphDecoder | None = None
        self.fixed_step: int | None = None
        self._batched: BatchedGreedyDecoder | None = None
        # forwards per route (``route_of``): a benchmark reads the difference over a run to tell what ran eagerly
        self.routes: Counter[str] = Counter()

    def count_route(self, route: str) -> None:
        """Count one forward under ``route`` (``route_of``'s names; wrappers that replay their own graphs
        over this model's cache, e.g. ``EagleTarget``, count theirs here too)."""
        self.routes[route] += 1

    def enable_cuda_graphs(self, max_length: int, dtype: torch.dtype, device: torch.device,
                           step_sizes: Sequence[int] = (1,), compile: bool = False, fixed_step: int | None = None,
                           fuse: bool = True, kernels: bool | None = None, tree_step: int | None = None) -> None:
        """Capture graphs of the ``step_sizes``-token steps over a static cache of ``max_length`` positions.

        See ``VisionLanguageModel.enable_cuda_graphs`` for the options; ``tree_step`` also captures the
        tree graph of that many rows (draft-tree verifies, Triton kernels only; else on first use).
        """
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device (use eager decoding on CPU)")
        if fuse:
            self.runner.fuse_projections()
        self.runner.use_kernels((not compile if kernels is None else kernels) and fuse)
        cache = self.runner.new_cache(max_length, dtype, device)
        sizes = sorted({*step_sizes, *([fixed_step] if fixed_step else []), *([tree_step] if tree_step else [])})
        self.graphs = CudaGraphDecoder(self.runner, cache, sizes, compile=compile)
        self.graphs.capture_all()
        if tree_step and self.runner.kernels_on:
            self.graphs.capture_tree(tree_step)
        self.fixed_step = fixed_step

    def use_fixed_step(self, size: int | None) -> None:
        """Route every graph step through padded ``size``-token steps (None: the fastest captured fit)."""
        if size is not None and (self.graphs is None or size not in self.graphs.sizes):
            raise ValueError(f"fixed step {size} needs enable_cuda_graphs with that step size")
        self.fixed_step = size

    def disable_cuda_graphs(self) -> None:
        """Back to eager steps with a fresh cache per prefill; the Triton kernels off."""
        self.graphs = None
        self.runner.use_kernels(False)

    def new_cache(self, prompt_length: int, room: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The cache a prefill of ``prompt_length`` tokens writes into: the graphs' static one, emptied,
        or a fresh one with ``room`` positions beyond the prompt."""
        if self.graphs is None:
            return self.runner.new_cache(prompt_length + room, dtype, device)
        cache = self.graphs.cache
        if prompt_length + max(self.graphs.sizes) > cache.capacity:
            raise ValueError(f"prompt of {prompt_length} tokens does not fit the static cache "
                             f"({cache.capacity}); enable_cuda_graphs with a larger max_length")
        cache.length = 0
        return cache

    def step(self, cache: KVCache, embeds: torch.Tensor, hidden_layers: Sequence[int] = (), *,
             attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Append k token embeddings (k, H) to ``cache``; return float32 logits (k, V) and the asked hidden states.

        Graph replays serve the graphs' own cache when only the final layer (-1) is asked; a draft
        tree (``attn_mask``/``position_ids``) replays a tree graph when the Triton kernels are on
        (``replay_tree``); everything else runs eagerly.
        """
        graphs = self.graphs
        # graphs also return the final normed state, so layer -1 requests stay on the fast path
        final_only = all(i in (-1, self.runner.shape.num_layers) for i in hidden_layers)
        usable = graphs is not None and final_only and cache is graphs.cache
        if usable:
            logits = (replay(graphs, embeds, self.fixed_step) if attn_mask is None
                      else replay_tree(graphs, embeds, attn_mask, position_ids, self.fixed_step))
            if logits is not None:
                self.count_route(route_of(graphs, embeds.shape[0], self.fixed_step, attn_mask, position_ids, True))
                return logits, {i: graphs.last_hidden for i in hidden_layers}
        self.count_route(route_of(graphs if usable else None, embeds.shape[0], self.fixed_step, attn_mask,
                                  position_ids, False))
        return self.runner.run(embeds, cache, hidden_layers, attn_mask=attn_mask, position_ids=position_ids)

    def batched(self, device: torch.device) -> BatchedGreedyDecoder:
        """The batched greedy decoder over this runner (made once; fused projections on CUDA)."""
        if self._batched is None:
            if device.type == "cuda":
                self.runner.fuse_projections()  # no-op for quantized layers
            self._batched = BatchedGreedyDecoder(self.runner)
        return self._batched
