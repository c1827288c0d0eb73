"""EventGPT behind the uniform interface (the draft model: event frames -> text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from common.cli import resolve_device
from common.data import load_event_frames
from common.models.checkpoint import (
    expect_model_type,
    load_pretrained,
    pretrained_kwargs,
    read_checkpoint_config,
)
from common.models.eventgpt import (
    EVENT_END_TOKEN,
    EVENT_PATCH_TOKEN,
    EVENT_PLACEHOLDER_ID,
    EVENT_START_TOKEN,
    EVENT_TOKEN,
    MODEL_TYPE,
    SYSTEM_PROMPT,
    EventGPTForCausalLM,
    register_eventgpt,
)
from common.models.vision import clip_image_processor, images_to_pixels
from common.vlm import VisionLanguageModel, VisualInput

FLAG = "--eventgpt_path"
# Modules kept out of 4-bit/8-bit quantization (upstream runs them in bf16).
SKIP_QUANT = ("visual_tower", "visual_projector", "feature_adaptor")


class EventGPTVLM(VisionLanguageModel):
    """EventGPT: N rendered event frames -> CLIP -> projector -> adaptor -> pooled event tokens."""

    name = "eventgpt"

    def __init__(self, model: EventGPTForCausalLM, tokenizer: Any, image_processor: Any,
                 num_event_frames: int = 5, allow_pickle: bool = False):
        super().__init__(model, model.model, model.lm_head, tokenizer, base_vocab_size=tokenizer.vocab_size)
        self.image_processor = image_processor
        self.num_event_frames = num_event_frames
        self.allow_pickle = allow_pickle
        self.use_start_end = bool(getattr(model.config, "mm_use_im_start_end", False))

    def build_prompt(self, question: str) -> str:
        """The ``eventgpt_v1`` (Vicuna v1) prompt with the event placeholder."""
        event = f"{EVENT_START_TOKEN}{EVENT_TOKEN}{EVENT_END_TOKEN}" if self.use_start_end else EVENT_TOKEN
        return f"{SYSTEM_PROMPT} USER: {event}\n{question} ASSISTANT:"

    def build_prompt_ids(self, question: str) -> list[int]:
        """Prompt ids as upstream builds them: chunks around ``<event>`` tokenized apart, -200 between."""
        chunks = self.build_prompt(question).split(EVENT_TOKEN)
        ids: list[int] = [self.tokenizer.bos_token_id]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(EVENT_PLACEHOLDER_ID)
            if chunk:
                ids.extend(self.tokenizer(chunk, add_special_tokens=False).input_ids)
        return ids

    def load_visual(self, sample: Any) -> list[np.ndarray]:
        # the sample carries its data source's setting; a model loaded with allow_pickle=True trusts every file
        return load_event_frames(sample, num_frames=self.num_event_frames, allow_pickle=self.allow_pickle or None)

    def preprocess(self, raw: list[np.ndarray]) -> torch.Tensor:
        tower_dtype = next(self.model.model.visual_tower.parameters()).dtype
        return images_to_pixels(self.image_processor, raw, self.device, tower_dtype)

    def encode_pixels_eager(self, pixels: torch.Tensor) -> VisualInput:
        return VisualInput(self.model.encode_events(pixels).to(self.dtype))

    def prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor:
        ids = torch.tensor(self.prompt_ids(question), device=self.device)
        slot = (ids == EVENT_PLACEHOLDER_ID).nonzero().flatten()
        if slot.numel() != 1:
            raise ValueError("the EventGPT prompt must hold exactly one <event> placeholder")
        at = int(slot[0])
        before = self.embed_tokens(ids[:at])
        after = self.embed_tokens(ids[at + 1:])
        return torch.cat([before, visual.embeds.to(before.dtype), after], dim=0)


def load_eventgpt(path: str | Path, quant: str | None = None, device: str | torch.device | None = None,
                  num_event_frames: int = 5, allow_pickle: bool = False) -> EventGPTVLM:
    """Load an EventGPT checkpoint folder (released layout) behind the uniform interface."""
    device = resolve_device(device)
    config = read_checkpoint_config(path, FLAG)
    expect_model_type(config, path, MODEL_TYPE, FLAG)
    register_eventgpt()
    model = load_pretrained(EventGPTForCausalLM, path, pretrained_kwargs(quant, device, SKIP_QUANT), FLAG)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    wanted = [EVENT_PATCH_TOKEN] if model.config.mm_use_im_patch_token else []
    if model.config.mm_use_im_start_end:
        wanted += [EVENT_START_TOKEN, EVENT_END_TOKEN]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:  # upstream adds these at load time and resizes the embeddings
        tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    image_size = model.model.visual_tower.visual_tower.config.image_size
    processor = clip_image_processor(path, image_size)
    return EventGPTVLM(model, tokenizer, processor, num_event_frames=num_event_frames, allow_pickle=allow_pickle)
