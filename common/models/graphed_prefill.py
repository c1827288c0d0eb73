"""The LLM prefill as a CUDA-graph replay over the static decode cache, one graph per prompt length.

An eager 7B prefill is ~500 kernel launches from Python. When two models run from two threads of
one process (``common.parallel``), those launches wait on the interpreter lock behind the other
model's; a replay is one launch. Prompt lengths vary with the question, so each length seen gets
its own capture, up to ``max_lengths`` (beyond that the prefill stays eager). The graph writes the
prompt's keys/values at positions 0..T-1 of the static cache (``Decoding``'s), so it is only used
while decode graphs are on; same kernels as the eager prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.models.decoder import KVCache, LlamaRunner, capture_graph

Capture = Callable[[Callable[[], Any], torch.device], tuple[Any, Any]]


class GraphedPrefill:
    """``(embeds (T, H), cache, hidden_layers) -> (last logits (1, V), hidden dict)`` by replay; None: run eagerly."""

    def __init__(self, runner: LlamaRunner, max_lengths: int = 8, capture: Capture | None = None):
        self.runner = runner
        self.max_lengths = int(max_lengths)
        # capture(fn, device) -> (graph with .replay(), outputs): common.models.decoder.capture_graph by default
        self._capture_fn = capture or (lambda fn, device: capture_graph(fn, device, warmup=1))
        self._graphs: dict[tuple, tuple[Any, torch.Tensor, Any]] = {}

    def __call__(self, embeds: torch.Tensor, cache: KVCache, hidden_layers: Sequence[int] = ()
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        if torch.is_grad_enabled() or cache.length != 0 or embeds.shape[0] > cache.capacity:
            return None
        key = (tuple(embeds.shape), embeds.dtype, tuple(hidden_layers), cache.keys.data_ptr())
        if key not in self._graphs:
            if len(self._graphs) >= self.max_lengths:
                return None
            self._graphs[key] = self._capture(embeds, cache, tuple(hidden_layers))
        graph, static_in, (logits, hidden) = self._graphs[key]
        static_in.copy_(embeds)
        if embeds.device.type == "cuda":
            with torch.cuda.device(embeds.device):
                graph.replay()
        else:  # a test's stand-in graph
            graph.replay()
        cache.length = embeds.shape[0]
        return logits.clone(), {i: h.clone() for i, h in hidden.items()}

    def _capture(self, embeds: torch.Tensor, cache: KVCache, hidden_layers: tuple[int, ...]):
        static_in = embeds.clone()

        def prefill():
            cache.length = 0  # every warm-up and the capture write positions 0..T-1
            return self.runner.run(static_in, cache, hidden_layers, all_logits=False)

        graph, outputs = self._capture_fn(prefill, embeds.device)
        return graph, static_in, outputs

    @property
    def lengths(self) -> int:
        """How many prompt shapes have a captured graph."""
        return len(self._graphs)
