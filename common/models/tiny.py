"""Tiny checkpoints of both models in exactly the released on-disk formats.

Nothing is downloaded: a byte-level-safe BPE tokenizer is trained locally on a corpus, both
models share its base ids (like Vicuna's 32000) and each adds its own special tokens above
them; weights are random (seeded) or trained later, and saved with ``save_pretrained``
(config.json, model.safetensors, tokenizer and processor files).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.models.eventgpt import (
    EVENT_END_TOKEN,
    EVENT_PATCH_TOKEN,
    EVENT_START_TOKEN,
    EVENT_TOKEN,
    SYSTEM_PROMPT,
    EventChatConfig,
    EventGPTForCausalLM,
)
from common.models.vision import clip_image_processor
from common.synthetic import tokenizer_corpus

PAD_MULTIPLE = 64  # Video-LLaVA pads its vocabulary to a multiple of 64 (32003 -> 32064)
EVENTGPT_SPECIAL = [EVENT_TOKEN, EVENT_PATCH_TOKEN, EVENT_START_TOKEN, EVENT_END_TOKEN]
VIDEOLLAVA_SPECIAL = ["<image>", "<video>", "<pad>"]


@dataclass
class TinySize:
    """Sizes of one tiny model: its LLaMA decoder and its CLIP vision tower."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    max_positions: int = 1024


def prompt_corpus() -> list[str]:
    """Prompt scaffolding both models see, so the tokenizer covers it."""
    return [SYSTEM_PROMPT, "USER:", "ASSISTANT:", "USER: \n ASSISTANT:"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1000):
    """Train a Llama-style BPE tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, metaspace, BOS added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(corpus) + prompt_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def _padded(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _vision_dict(size: TinySize) -> dict:
    return dict(hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
                num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.vision_hidden,
                hidden_act="quick_gelu")


def _llama_kwargs(size: TinySize, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_heads, max_position_embeddings=size.max_positions,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def build_eventgpt(tokenizer, size: TinySize, seed: int = 0, vocab_size: int | None = None):
    """A random-weight EventGPT with its own special tokens added above the shared base ids.

    ``vocab_size`` (default: the tokenizer's length) gives real-shape embedding tables.
    """
    tok = _copy_tokenizer(tokenizer)
    tok.add_tokens(EVENTGPT_SPECIAL, special_tokens=True)
    config = EventChatConfig(
        mm_visual_tower="openai/clip-vit-large-patch14-336", visual_tower_config=_vision_dict(size),
        mm_hidden_size=size.vision_hidden, event_feature_adaptor=True, mm_use_im_start_end=False,
        mm_use_im_patch_token=True, architectures=["EventGPTForCausalLM"],
        **_llama_kwargs(size, max(len(tok), vocab_size or 0)))
    torch.manual_seed(seed)
    return EventGPTForCausalLM(config), tok


def build_videollava(tokenizer, size: TinySize, seed: int = 0, vocab_size: int | None = None):
    """A random-weight Video-LLaVA with ``<image>``, ``<video>``, ``<pad>`` above the base ids (padded to 64)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    tok = _copy_tokenizer(tokenizer)
    tok.add_tokens(VIDEOLLAVA_SPECIAL, special_tokens=True)
    tok.pad_token = "<pad>"
    vocab = _padded(max(len(tok), vocab_size or 0), PAD_MULTIPLE)
    text = LlamaConfig(**{**_llama_kwargs(size, vocab), "pad_token_id": tok.convert_tokens_to_ids("<pad>")})
    patches = (size.image_size // size.patch_size) ** 2
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_dict(size)), text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=patches, video_seq_length=8 * (patches + 1))
    torch.manual_seed(seed)
    return VideoLlavaForConditionalGeneration(config), tok


def _copy_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False)


def save_eventgpt(model, tokenizer, folder: str | Path, size: TinySize,
                  image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> Path:
    """Write the released EventGPT layout: config.json, model.safetensors, tokenizer, CLIP preprocessor
    (CLIP's normalisation unless ``image_mean`` / ``image_std`` are given, e.g. a white mean for event frames)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    processor = clip_image_processor(None, size.image_size)
    if image_mean is not None:
        processor.image_mean = [float(v) for v in image_mean]
    if image_std is not None:
        processor.image_std = [float(v) for v in image_std]
    processor.save_pretrained(folder)
    return folder


def save_videollava(model, tokenizer, folder: str | Path, size: TinySize) -> Path:
    """Write the Video-LLaVA-hf layout: config.json, model.safetensors, tokenizer, processor configs."""
    import json

    from transformers import VideoLlavaImageProcessor

    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    VideoLlavaImageProcessor(size={"shortest_edge": size.image_size},
                             crop_size={"height": size.image_size, "width": size.image_size}).save_pretrained(folder)
    processor_config = {"processor_class": "VideoLlavaProcessor", "patch_size": size.patch_size,
                        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    return folder


def size_dict(size: TinySize) -> dict:
    """JSON-ready sizes (stored next to the checkpoints)."""
    return asdict(size)


# The random pair: the target is larger and sees ~6x more visual tokens, like the real pair.
# Every width the 4-bit path quantizes is a multiple of 64, so bitsandbytes' packed CPU path
# (AVX512-BF16 CPUs: 64-wide blocks along in_features, 32-row blocks along out_features) runs.
EVENTGPT_SIZE = TinySize(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
VIDEOLLAVA_SIZE = TinySize(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256)


def make_tiny_models(output_dir: str | Path, seed: int = 0, vocab_size: int = 1000,
                     eventgpt_size: TinySize = EVENTGPT_SIZE, videollava_size: TinySize = VIDEOLLAVA_SIZE,
                     corpus: list[str] | None = None) -> dict:
    """Build and save both random tiny checkpoints under ``output_dir``; returns their paths and sizes.

    The tokenizer is trained on ``corpus`` (default: the synthetic world's questions and answers).
    """
    out = Path(output_dir)
    tokenizer = build_tokenizer(corpus if corpus is not None else tokenizer_corpus(), vocab_size)
    egpt, egpt_tok = build_eventgpt(tokenizer, eventgpt_size, seed=seed)
    vllava, vllava_tok = build_videollava(tokenizer, videollava_size, seed=seed + 1)
    paths = {
        "eventgpt": save_eventgpt(egpt, egpt_tok, out / "eventgpt", eventgpt_size),
        "videollava": save_videollava(vllava, vllava_tok, out / "videollava", videollava_size),
    }
    summary = {
        "output_dir": str(out),
        "seed": seed,
        "base_vocab_size": tokenizer.vocab_size,
        "eventgpt": {"path": str(paths["eventgpt"]), "size": size_dict(eventgpt_size),
                     "parameters": sum(p.numel() for p in egpt.parameters())},
        "videollava": {"path": str(paths["videollava"]), "size": size_dict(videollava_size),
                       "parameters": sum(p.numel() for p in vllava.parameters())},
    }
    (out / "tiny_models.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
