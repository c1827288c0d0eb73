"""Checkpoint folders: checks, precision/quantization keyword arguments, loading with clear errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.models.errors import ModelLoadError
from common.models.quant import compute_dtype, cpu_4bit_unpackable_layers, default_quant, quantization_config

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: unreadable JSON ({_one_line(exc)}); "
                             "restore the checkpoint's config.json") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: holds a JSON {type(config).__name__}, not an object; "
                             "restore the checkpoint's config.json")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors or *.bin); the download is incomplete")
    return config


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def _shown(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _index_shards(index_file: Path) -> dict[str, str]:
    """``weight name -> shard file`` of a ``*.safetensors.index.json``; every shard must exist."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index_file}: unreadable shard index ({_one_line(exc)}); "
                             "re-download the checkpoint") from exc
    for shard in sorted(set(map(str, weight_map.values()))):
        if not (index_file.parent / shard).is_file():
            raise ModelLoadError(f"{index_file.parent / shard}: shard listed in {index_file.name} is missing; "
                                 "re-download the checkpoint")
    return weight_map


def safetensors_header(file: str | Path, fix: str = "re-download or re-save the checkpoint",
                       ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name -> shape, metadata) of one safetensors file, from its header only.

    A corrupt or truncated file raises a one-line ``ModelLoadError`` naming the file and ``fix``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return shapes, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({_one_line(exc)}); {fix}") from exc


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only), checking each file.

    A corrupt or truncated file, a missing shard or an index naming a tensor its shard lacks raises a
    one-line ``ModelLoadError`` naming the file.
    """
    folder = Path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for index_file in sorted(folder.glob("*.safetensors.index.json")):
        where.update(_index_shards(index_file))
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update(safetensors_header(file)[0])
    absent = [k for k in where if k not in shapes]
    if absent:
        raise ModelLoadError(f"{folder}: the shard index lists tensors no shard holds ({_shown(absent)}); "
                             "re-download the checkpoint")
    return shapes


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


# Buffers older checkpoints saved that are recomputed at construction (safe to ignore when present).
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "position_ids")


def _checkpoint_key_renamer(reference: torch.nn.Module):
    """Checkpoint key -> model key as transformers renames it on load (Video-LLaVA's files keep the old names).

    Uses transformers' own renaming table; if that API is unavailable, keys are compared as they are
    (and transformers' own checks remain).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(reference)
    except (ImportError, AttributeError, TypeError, ValueError):
        return lambda key: key
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        try:
            name, converted = rename_source_key(key, renamings, converters)
        except (AttributeError, TypeError, ValueError, KeyError):
            return key
        return key if converted is not None else name

    return rename


def _check_shapes(model_cls, path: str | Path, shapes: dict[str, tuple[int, ...]], flag: str) -> None:
    """Refuse checkpoint tensors whose shape differs from the model its config.json builds (before loading)."""
    if not shapes:
        return
    config = model_cls.config_class.from_pretrained(str(path))
    with torch.device("meta"):
        reference = model_cls(config)
    rename = _checkpoint_key_renamer(reference)
    expected = {key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}
    wrong = []
    for key, shape in shapes.items():
        name = rename(key)
        if name in expected and expected[name] != shape:
            wrong.append(f"{key} {list(shape)} vs {list(expected[name])}")
    if wrong:
        raise ModelLoadError(f"{path}: weights of another shape than config.json builds "
                             f"(checkpoint vs model: {_shown(wrong, 3)}); config.json and the weights "
                             f"come from different checkpoints (check {flag})")


def _check_loading_info(path: str | Path, info: dict[str, Any]) -> None:
    """Refuse missing, unexpected or mismatched weights, naming the folder and a few keys."""
    def real(keys):
        return [k for k in keys if not k.endswith(RECOMPUTED_BUFFERS)]

    missing, unexpected = real(info.get("missing_keys", [])), real(info.get("unexpected_keys", []))
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    if missing:
        raise ModelLoadError(f"{path}: checkpoint is missing weights {_shown(missing)}; "
                             "the checkpoint is incomplete or of another model")
    if unexpected:
        raise ModelLoadError(f"{path}: checkpoint holds weights the model of its config.json does not use "
                             f"({_shown(unexpected)}); config.json (e.g. its layer count) does not match the weights")
    if mismatched:
        raise ModelLoadError(f"{path}: weights of another shape than config.json builds ({_shown(mismatched)}); "
                             "config.json and the weights come from different checkpoints")


def _check_cpu_4bit_packing(model, path: str | Path) -> None:
    """One line instead of a reshape error deep in bitsandbytes when its packed CPU path cannot pack a layer."""
    bad = cpu_4bit_unpackable_layers(model)
    if bad:
        raise ModelLoadError(
            f"{path}: --quant 4bit on this CPU (AVX512-BF16) needs every quantized layer's in_features to be a "
            f"multiple of 64 and out_features of 32, not {_shown(bad, 3)}; use --quant 8bit or fp32 here")


def load_pretrained(model_cls, path: str | Path, kwargs: dict[str, Any], flag: str):
    """``model_cls.from_pretrained`` that refuses corrupt files and mismatched weights with one line naming the folder."""
    from safetensors import SafetensorError

    shapes = safetensors_shapes(path)
    try:
        _check_shapes(model_cls, path, shapes, flag)
        model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except ModelLoadError as exc:
        if str(path) in str(exc):
            raise
        raise ModelLoadError(f"{Path(path) / 'config.json'}: {exc}") from exc
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: could not load the checkpoint ({_one_line(exc)}); check {flag}") from exc
    _check_loading_info(path, info)
    _check_cpu_4bit_packing(model, path)
    model.eval()
    return model
