"""Image preprocessing shared by both models (transformers' CLIP-style processors)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def clip_image_processor(folder: str | Path | None, image_size: int):
    """The checkpoint's image processor if it has one, else CLIP's default preprocessing at ``image_size``."""
    from transformers import AutoImageProcessor, CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "no torchvision, using the PIL backend" notice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = Path(folder) / "preprocessor_config.json" if folder is not None else None
            if config is not None and config.is_file():
                try:
                    return AutoImageProcessor.from_pretrained(str(folder))
                except ImportError:  # some 5.x releases' auto class wants torchvision; the classes don't
                    from transformers import VideoLlavaImageProcessor

                    kind = json.loads(config.read_text()).get("image_processor_type", "")
                    cls = VideoLlavaImageProcessor if kind.startswith("VideoLlava") else CLIPImageProcessor
                    return cls.from_pretrained(str(folder))
            return CLIPImageProcessor(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    finally:
        hf_logging.set_verbosity(verbosity)


def images_to_pixels(processor, images: Sequence[np.ndarray] | np.ndarray, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 images (N, H, W, 3) -> normalised pixel tensor (N, 3, S, S) on ``device``."""
    batch = [np.asarray(im) for im in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images=batch, return_tensors="pt")
    pixels = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
    return pixels.to(device=device, dtype=dtype)
