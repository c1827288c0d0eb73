"""One loader for both models: ``load_vlm(kind, path)`` behind the uniform interface.

The checkpoint checks and precision/quantization helpers live in :mod:`common.models.checkpoint`
(re-exported here for existing imports).
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.models.checkpoint import (  # noqa: F401  (re-exported)
    WEIGHT_PATTERNS,
    expect_model_type,
    load_pretrained,
    pretrained_kwargs,
    read_checkpoint_config,
    safetensors_header,
    safetensors_shapes,
)
from common.models.eventgpt_vlm import load_eventgpt
from common.models.videollava_vlm import load_videollava


def load_vlm(kind: str, path: str | Path, quant: str | None = None, device: str | torch.device | None = None,
             **kwargs):
    """Load ``kind`` ('eventgpt' or 'videollava') behind the uniform interface."""
    if kind == "eventgpt":
        return load_eventgpt(path, quant=quant, device=device, **kwargs)
    if kind == "videollava":
        return load_videollava(path, quant=quant, device=device, **kwargs)
    raise ValueError(f"unknown model kind {kind!r}: expected 'eventgpt' or 'videollava'")
