"""Video-LLaVA behind the uniform interface (the target model: 8 video frames -> text).

Uses transformers' own ``VideoLlavaForConditionalGeneration`` and its image processor; the
LLM part runs through the shared ``LlamaRunner`` over ``model.model.language_model`` and
``model.lm_head`` (the transformers 5.x module tree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

from common.cli import resolve_device
from common.data import load_video_frames
from common.models.checkpoint import (
    expect_model_type,
    load_pretrained,
    pretrained_kwargs,
    read_checkpoint_config,
)
from common.models.vision import clip_image_processor, images_to_pixels
from common.vlm import VisionLanguageModel, VisualInput

FLAG = "--videollava_path"
MODEL_TYPE = "video_llava"
VIDEO_TOKEN = "<video>"
NUM_FRAMES = 8
# Modules kept out of 4-bit/8-bit quantization.
SKIP_QUANT = ("video_tower", "image_tower", "multi_modal_projector")


class VideoLlavaVLM(VisionLanguageModel):
    """Video-LLaVA: 8 frames -> CLIP (layer -2, CLS kept) -> projector -> 8 x (patches + 1) tokens."""

    name = "videollava"

    def __init__(self, model: VideoLlavaForConditionalGeneration, tokenizer: Any, image_processor: Any,
                 frame_cache: Any = None):
        super().__init__(model, model.model.language_model, model.lm_head, tokenizer,
                         base_vocab_size=tokenizer.vocab_size)
        self.image_processor = image_processor
        self.frame_cache = frame_cache
        self.video_token_id = int(model.config.video_token_index)

    def build_prompt(self, question: str) -> str:
        return f"USER: {VIDEO_TOKEN}\n{question} ASSISTANT:"

    def build_prompt_ids(self, question: str, num_visual_tokens: int) -> list[int]:
        """Prompt ids as the processor builds them: ``<video>`` repeated once per visual token."""
        text = self.build_prompt(question).replace(VIDEO_TOKEN, VIDEO_TOKEN * num_visual_tokens)
        return list(self.tokenizer(text).input_ids)

    def load_visual(self, sample: Any) -> np.ndarray:
        return load_video_frames(sample, num_frames=NUM_FRAMES, cache=self.frame_cache)  # None: the sample's

    def preprocess(self, raw: np.ndarray) -> torch.Tensor:
        tower_dtype = next(self.model.model.video_tower.parameters()).dtype
        return images_to_pixels(self.image_processor, list(raw), self.device, tower_dtype).unsqueeze(0)

    def encode_pixels_eager(self, pixels: torch.Tensor) -> VisualInput:
        out = self.model.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=self.model.config.vision_feature_layer)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return VisualInput(feats.reshape(-1, feats.shape[-1]).to(self.dtype))

    def prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor:
        ids = torch.tensor(self.prompt_ids(question, visual.num_tokens), device=self.device)
        embeds = self.embed_tokens(ids).clone()
        mask = ids == self.video_token_id
        embeds[mask] = visual.embeds.to(embeds.dtype)
        return embeds


def load_videollava(path: str | Path, quant: str | None = None, device: str | torch.device | None = None,
                    frame_cache: Any = None) -> VideoLlavaVLM:
    """Load a Video-LLaVA (-hf) checkpoint folder behind the uniform interface."""
    device = resolve_device(device)
    config = read_checkpoint_config(path, FLAG)
    expect_model_type(config, path, MODEL_TYPE, FLAG)
    model = load_pretrained(VideoLlavaForConditionalGeneration, path,
                            pretrained_kwargs(quant, device, SKIP_QUANT), FLAG)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_size = model.config.vision_config.image_size
    processor = clip_image_processor(path, image_size)
    return VideoLlavaVLM(model, tokenizer, processor, frame_cache=frame_cache)
