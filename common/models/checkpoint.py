"""Checkpoint folders: checks, precision/quantization keyword arguments, loading with clear errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.models.errors import ModelLoadError
from common.models.quant import compute_dtype, default_quant, quantization_config

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def read_checkpoint_config(path: str | Path, flag: str) -> dict:
    """Check that ``path`` is a checkpoint folder with config.json and weights; return the config dict."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such checkpoint folder; pass {flag} pointing to a folder "
                             "with config.json and *.safetensors")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: missing; {folder} is not a transformers checkpoint folder "
                             f"(pass {flag} pointing to one)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: unreadable JSON ({exc}); restore the checkpoint's config.json") from exc
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors or *.bin); the download is incomplete")
    return config


def expect_model_type(config: dict, path: str | Path, expected: str, flag: str) -> None:
    """Raise a one-line error when the checkpoint is of another model type."""
    found = config.get("model_type")
    if found != expected:
        raise ModelLoadError(f"{Path(path) / 'config.json'}: model_type is {found!r}, expected {expected!r}; "
                             f"{flag} must point to a {expected} checkpoint")


def pretrained_kwargs(quant: str | None, device: torch.device, skip_modules: Sequence[str]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a ``--quant`` choice on ``device``."""
    quant = quant or default_quant(device)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(quant, device)}
    qconf = quantization_config(quant, device, skip_modules)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    return kwargs


def load_pretrained(model_cls, path: str | Path, kwargs: dict[str, Any], flag: str):
    """``model_cls.from_pretrained`` that refuses missing weights, naming the folder and the keys."""
    try:
        model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: could not load the checkpoint ({first}); check {flag}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{path}: checkpoint is missing weights {shown}{more}; "
                             "the checkpoint is incomplete or of another model")
    model.eval()
    return model

