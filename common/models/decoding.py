"""How one model runs its decode and verify steps: eagerly, or as CUDA-graph replays over a static KV cache.

``Decoding`` owns the captured graphs (``CudaGraphDecoder``), the fixed step, the Triton-kernels
switch of the runner and the batched greedy decoder; ``step`` is the public entry every forward of
a ``VisionLanguageModel`` goes through (``vlm.decoding``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    if not graphs.runner.kernels_on or position_ids is None:
        return None
    k, start = embeds.shape[0], graphs.cache.length
    size = fixed_step if fixed_step else graphs.size_for(k)
    if size is None or k > size or start + size > graphs.cache.capacity:
        return None
    rows = tree_row_map(attn_mask, position_ids.reshape(-1), start)
    return None if rows is None else graphs.step_tree(embeds, position_ids.reshape(-1), rows, size)


class Decoding:
    """Decode routing of one model's LLM: eager steps, or CUDA graphs (+ fixed step, + kernels)."""

    def __init__(self, runner: LlamaRunner):
        self.runner = runner
        self.graphs: CudaGraphDecoder | None = None
        self.fixed_step: int | None = None
        self._batched: BatchedGreedyDecoder | None = None

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
        if graphs is not None and final_only and cache is graphs.cache:
            logits = (replay(graphs, embeds, self.fixed_step) if attn_mask is None
                      else replay_tree(graphs, embeds, attn_mask, position_ids, self.fixed_step))
            if logits is not None:
                return logits, {i: graphs.last_hidden for i in hidden_layers}
        return self.runner.run(embeds, cache, hidden_layers, attn_mask=attn_mask, position_ids=position_ids)

    def batched(self, device: torch.device) -> BatchedGreedyDecoder:
        """The batched greedy decoder over this runner (made once; fused projections on CUDA)."""
        if self._batched is None:
            if device.type == "cuda":
                self.runner.fuse_projections()  # no-op for quantized layers
            self._batched = BatchedGreedyDecoder(self.runner)
        return self._batched
