"""The vision path (tower + projector) as CUDA-graph replays, one graph per pixel shape.

A CLIP tower at batch 8 is a few hundred small kernels. Launched eagerly from Python it costs
more host time than GPU time, and when two models run from two threads of one process (parallel
prefill) their launches queue behind each other on the interpreter lock: measured on two GPUs,
the target's eager vision encode went from ~15 ms alone to ~110 ms while the draft was encoding
too. A replay is one launch, so the two threads no longer hold each other up.

If capture fails (a model whose vision code synchronises with the host), the wrapper logs it
once and stays eager for that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from common.models.decoder import capture_graph
from common.timing import sync

log = logging.getLogger(__name__)


class GraphedVisionEncoder:
    """Call like ``encode_pixels(pixels) -> VisualInput``; replays a captured graph per input shape."""

    def __init__(self, encode: Callable[[torch.Tensor], Any], device: torch.device):
        self.encode = encode
        self.device = device
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any] | None] = {}

    def __call__(self, pixels: torch.Tensor) -> Any:
        if pixels.device.type != "cuda" or torch.is_grad_enabled():
            return self.encode(pixels)
        key = (tuple(pixels.shape), pixels.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(pixels)
        entry = self._graphs[key]
        if entry is None:
            return self.encode(pixels)
        graph, static_in, static_out = entry
        static_in.copy_(pixels)
        with torch.cuda.device(self.device):
            graph.replay()
        return type(static_out)(static_out.embeds.clone())

    def _capture(self, pixels: torch.Tensor):
        static_in = pixels.clone()
        try:
            graph, static_out = capture_graph(lambda: self.encode(static_in), self.device, warmup=2)
        except RuntimeError as exc:  # torch.AcceleratorError is a RuntimeError
            log.warning("vision encode of shape %s could not be captured as a CUDA graph (%s); staying eager",
                        tuple(pixels.shape), str(exc).splitlines()[0])
            sync(self.device)
            return None
        return graph, static_in, static_out
