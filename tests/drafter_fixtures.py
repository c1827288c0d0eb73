"""Drafters for the shipped pair, untrained but non-trivial, in their on-disk formats (widening tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.defaults import MODELS_DIR
from common.drafters.eagle_head import EagleHead, head_config_from_checkpoint, save_eagle_head
from common.drafters.hidden_adapter import create_adapter, save_adapter
from common.drafters.token_adapter import TokenAdapter, TokenAdapterConfig


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Non-trivial weights for an untrained drafter (zero-initialised output layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def make_small_drafters(out: Path, models_dir: Path = MODELS_DIR) -> dict[str, Path]:
    """EAGLE head (``eagle``), ``L1`` (layer -1), ``L5`` (layer 1) and ``token_adapter`` under ``out``."""
    cfg = json.loads((models_dir / "videollava" / "config.json").read_text())["text_config"]
    egpt_cfg = json.loads((models_dir / "eventgpt" / "config.json").read_text())
    head = EagleHead(head_config_from_checkpoint(models_dir / "videollava", cfg["hidden_size"], -1,
                                                 cfg["vocab_size"]))
    _randomize(head, 0, std=0.05)
    save_eagle_head(head, out / "eagle")
    paths = {"eagle": out / "eagle"}
    for level, layer in ((1, -1), (5, 1)):
        adapter = create_adapter(level, egpt_cfg["hidden_size"], cfg["hidden_size"], vocab_size=cfg["vocab_size"])
        _randomize(adapter, level, std=0.1)
        paths[f"L{level}"] = save_adapter(adapter, out / f"L{level}.safetensors", {"input_layer": layer,
                                                                                   "target_layer": -1})
    tok = TokenAdapter(TokenAdapterConfig(draft_vocab_size=egpt_cfg["vocab_size"], target_vocab_size=cfg["vocab_size"],
                                          vocab_limit=min(egpt_cfg["vocab_size"], cfg["vocab_size"]) - 3, d_model=32,
                                          n_layers=1, n_heads=2, dropout=0.0))
    _randomize(tok, 9, std=0.3)
    paths["token_adapter"] = tok.save_pretrained(out / "token_adapter")
    return paths
