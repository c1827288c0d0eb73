"""Precision and quantization choices shared by every loader (``--quant``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

QUANT_CHOICES = ("4bit", "8bit", "bf16", "fp16", "fp32")


def default_quant(device: torch.device | str) -> str:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def compute_dtype(quant: str, device: torch.device | str) -> torch.dtype:
    """The dtype activations and unquantized modules use for a ``--quant`` choice."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    if quant == "fp32":
        return torch.float32
    if quant == "fp16":
        return torch.float16
    if quant == "bf16":
        return torch.bfloat16
    # 4bit/8bit: bf16 compute on devices that support it, else fp16 on CUDA, fp32 on CPU
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quant: str, device: torch.device | str, skip_modules: Sequence[str]):
    """A ``BitsAndBytesConfig`` for 4bit/8bit (vision towers, projectors and lm_head kept out), else None."""
    if quant not in ("4bit", "8bit"):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes ({exc})") from exc
    skip = list(dict.fromkeys([*skip_modules, "lm_head"]))
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(quant, device),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
