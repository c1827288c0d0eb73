"""Precision and quantization choices shared by every loader (``--quant``)."""

from __future__ import annotations

import re
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


def skip_patterns(names: Sequence[str]) -> list[str]:
    """``llm_int8_skip_modules`` entries that keep modules named ``names`` (at any depth) unquantized.

    transformers 5 matches each entry as a regex from the start of the full module name (or as a
    suffix), so a bare ``image_tower`` misses ``model.image_tower.encoder...``; older releases match
    substrings. Both forms are listed.
    """
    return list(dict.fromkeys([*names, *(rf"(?:.*\.)?{re.escape(n)}" for n in names)]))


def quantization_config(quant: str, device: torch.device | str, skip_modules: Sequence[str]):
    """A ``BitsAndBytesConfig`` for 4bit/8bit (vision towers, projectors and lm_head kept out), else None."""
    if quant not in ("4bit", "8bit"):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes ({exc})") from exc
    skip = skip_patterns([*skip_modules, "lm_head"])
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(quant, device),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


# bitsandbytes' packed 4-bit CPU path (taken on CPUs with AVX512-BF16, in eval mode without grad:
# ``Linear4bit.forward`` -> ``functional._convert_weight_packed_for_cpu``) regroups each weight into
# rows of ``CPU_PACK_BLOCK_N`` and its absmax into (out_features, in_features // blocksize).
CPU_PACK_BLOCK_N = 32
DEFAULT_4BIT_BLOCKSIZE = 64


def cpu_4bit_packable(in_features: int, out_features: int, blocksize: int = DEFAULT_4BIT_BLOCKSIZE) -> bool:
    """Whether bitsandbytes can pack an ``in_features -> out_features`` 4-bit layer for the AVX512-BF16 CPU path."""
    return in_features % blocksize == 0 and in_features % 2 == 0 and out_features % CPU_PACK_BLOCK_N == 0


def cpu_4bit_unpackable_layers(model: torch.nn.Module) -> list[str]:
    """``name (in->out)`` of the 4-bit layers that will take the packed CPU path and cannot be packed."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - depends on the environment
        return []
    bad = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", DEFAULT_4BIT_BLOCKSIZE)
        if not cpu_4bit_packable(module.in_features, module.out_features, blocksize):
            bad.append(f"{name} ({module.in_features}->{module.out_features})")
    return bad
