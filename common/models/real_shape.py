"""Random-weight models at the real pair's shapes (Vicuna-7B + CLIP ViT-L/14) for GPU measurements.

Nothing is downloaded: the shapes come from REFERENCE.md, weights are random, the tokenizer is
the tiny local one (prompt lengths are set by the visual tokens, which match the real pair).
Timings of such models are the real pair's timings; their outputs and acceptance are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.models.tiny import (
    TinySize,
    build_eventgpt,
    build_tokenizer,
    build_videollava,
    save_eventgpt,
    save_videollava,
)

LLAMA_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, max_positions=4096,
                vision_hidden=1024, vision_layers=24, vision_heads=16, patch_size=14)
EVENTGPT_7B = TinySize(**LLAMA_7B, image_size=336)
VIDEOLLAVA_7B = TinySize(**LLAMA_7B, image_size=224)
EVENTGPT_VOCAB = 32004  # 32000 + <event>, <ev_patch>, <ev_start>, <ev_end>
VIDEOLLAVA_VOCAB = 32064  # 32003 padded to a multiple of 64


def write_real_shape_pair(output_dir: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> dict[str, Path]:
    """Build both 7B-shape models on ``device`` and save them as checkpoints (for the real loaders)."""
    out = Path(output_dir)
    tok = build_tokenizer(["What are the key elements in this scene?"] * 4, 300)
    paths = {}
    builders = (("eventgpt", build_eventgpt, save_eventgpt, EVENTGPT_7B, EVENTGPT_VOCAB),
                ("videollava", build_videollava, save_videollava, VIDEOLLAVA_7B, VIDEOLLAVA_VOCAB))
    for kind, build, save, size, vocab in builders:
        if (out / kind / "config.json").is_file():
            paths[kind] = out / kind
            continue
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model, model_tok = build(tok, size, seed=seed, vocab_size=vocab)
        finally:
            torch.set_default_dtype(previous)
        paths[kind] = save(model, model_tok, out / kind, size)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return paths
