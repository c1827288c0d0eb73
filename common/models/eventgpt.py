"""EventGPT: our implementation of the released architecture (event frames -> text).

LLaVA-style: a CLIP vision tower reads each rendered event frame, a 2-layer MLP projector and
a linear feature adaptor map its tokens into the LLM, and spatio-temporal pooling turns N
frames into N + (patches + 1) event tokens (5 frames at 336 px -> 582). The module tree
reproduces the released checkpoint's state-dict keys:

    model.embed_tokens / model.layers.N.* / model.norm / lm_head
    model.visual_tower.visual_tower.vision_model.*   (a CLIPVisionModel inside a wrapper)
    model.visual_projector.0 / .2                   (Linear, GELU, Linear)
    model.feature_adaptor                           (Linear)

The vision tower is always built from configuration (never downloaded): from
``visual_tower_config`` in config.json, from a local CLIP folder named by ``mm_visual_tower``,
or from the known shape of the CLIP model that ``mm_visual_tower`` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from common.models.errors import ModelLoadError

MODEL_TYPE = "EventChat_llama"
EVENT_PLACEHOLDER_ID = -200
EVENT_TOKEN = "<event>"
EVENT_PATCH_TOKEN = "<ev_patch>"
EVENT_START_TOKEN = "<ev_start>"
EVENT_END_TOKEN = "<ev_end>"
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# Shapes of the CLIP towers that released EventGPT configs name in ``mm_visual_tower``
# (exact names, not substrings). Their weights come from the EventGPT checkpoint itself.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}


class EventChatConfig(LlamaConfig):
    """LlamaConfig plus EventGPT's multimodal fields (model_type ``EventChat_llama``)."""

    model_type = MODEL_TYPE

    def __init__(self, mm_visual_tower: str | None = None, visual_tower_config: dict | None = None,
                 event_feature_adaptor: bool | None = True, mm_use_im_start_end: bool = False,
                 mm_use_im_patch_token: bool = True, mm_hidden_size: int | None = None, **kwargs):
        self.mm_visual_tower = mm_visual_tower
        self.visual_tower_config = visual_tower_config
        self.event_feature_adaptor = event_feature_adaptor
        self.mm_use_im_start_end = mm_use_im_start_end
        self.mm_use_im_patch_token = mm_use_im_patch_token
        self.mm_hidden_size = mm_hidden_size
        super().__init__(**kwargs)


def vision_config_from(config: EventChatConfig) -> CLIPVisionConfig:
    """Build the CLIP vision config without downloading anything (see module docstring)."""
    if getattr(config, "visual_tower_config", None):
        return CLIPVisionConfig(**config.visual_tower_config)
    name = getattr(config, "mm_visual_tower", None)
    if name and (Path(name) / "config.json").is_file():
        data = json.loads((Path(name) / "config.json").read_text())
        return CLIPVisionConfig(**data.get("vision_config", data))
    key = "/".join(str(name).rstrip("/").split("/")[-2:]) if name else ""
    if key in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[key])
    raise ModelLoadError(
        f"cannot build EventGPT's vision tower from mm_visual_tower={name!r}: add a 'visual_tower_config' "
        "dict to config.json or point mm_visual_tower to a local CLIP folder"
    )


class CLIPVisionHolder(nn.Module):
    """Holds the CLIP vision transformer as ``vision_model`` whatever transformers' own CLIP layout.

    Older transformers nest it as ``CLIPVisionModel.vision_model``; 5.x releases flatten it.
    The released EventGPT keys are ``...visual_tower.vision_model.*``, so we keep that level.
    """

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        clip = CLIPVisionModel(vision_config)
        self.config = vision_config
        self.vision_model = getattr(clip, "vision_model", clip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class EventVisualTower(nn.Module):
    """Wrapper holding the CLIP model as ``visual_tower`` (as the released key names need)."""

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.visual_tower = CLIPVisionHolder(vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last hidden state per frame, CLS kept: (N, patches + 1, hidden)."""
        return self.visual_tower(pixel_values)


class EventChatModel(LlamaModel):
    """The LLaMA body plus EventGPT's visual tower, projector and feature adaptor."""

    config_class = EventChatConfig

    def __init__(self, config: EventChatConfig):
        super().__init__(config)
        vision_config = vision_config_from(config)
        self.visual_tower = EventVisualTower(vision_config)
        self.visual_projector = nn.Sequential(
            nn.Linear(vision_config.hidden_size, config.hidden_size), nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        if config.event_feature_adaptor:
            self.feature_adaptor = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()


class EventGPTForCausalLM(LlamaForCausalLM):
    """EventGPT's causal LM: ``model`` is an ``EventChatModel``, ``lm_head`` a plain Linear."""

    config_class = EventChatConfig

    def __init__(self, config: EventChatConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = EventChatModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def encode_events(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Event frames (N, 3, S, S) -> event tokens (N + patches + 1, hidden), spatio-temporally pooled.

        Each frame's CLIP tokens go through the projector and adaptor; then one token per frame
        (spatial mean) is followed by the per-token mean over frames (temporal mean).
        """
        body = self.model
        tower_dtype = next(body.visual_tower.parameters()).dtype
        feats = body.visual_tower(pixel_values.to(tower_dtype))
        proj_dtype = _module_dtype(body.visual_projector, feats.dtype)
        feats = body.visual_projector(feats.to(proj_dtype))
        if getattr(body, "feature_adaptor", None) is not None:
            feats = body.feature_adaptor(feats.to(_module_dtype(body.feature_adaptor, feats.dtype)))
        feats = feats.float()
        spatial = feats.mean(dim=1)  # (N, H): one token per frame
        temporal = feats.mean(dim=0)  # (P+1, H): mean over frames
        return torch.cat([spatial, temporal], dim=0)


def _module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The floating dtype a (possibly quantized) module computes in."""
    for p in module.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return default


def register_eventgpt() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` know ``EventChat_llama`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, EventChatConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(EventChatConfig, EventGPTForCausalLM)
    except ValueError:
        pass
