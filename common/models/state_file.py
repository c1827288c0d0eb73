"""Training states (weights, optimizer, scheduler, history) in one safetensors file: nothing is unpickled.

Tensors are stored as safetensors tensors; everything else (ints, floats, strings, bools, None, lists,
tuples and dicts, including the int-keyed dicts of optimizer states) is a JSON skeleton in the file's
metadata, with each tensor's place marked by its name. Loading never runs code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.models.errors import ModelLoadError

SKELETON_KEY = "state_json"
FORMAT = "eventgpt-toolkit-state/1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready skeleton of ``obj``; tensors go to ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file (tensors and plain values only)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"__tensor__"}:
        return tensors[node["__tensor__"]]
    if set(node) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if set(node) == {"__dict__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__dict__"]}
    raise ValueError(f"unknown node with keys {sorted(node)[:3]}")


def save_state(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically (a crash leaves the previous file or none, never half of one)."""
    from safetensors.torch import save

    from common.results import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(obj, tensors))
    atomic_write_bytes(Path(path), save(tensors, metadata={"format": FORMAT, SKELETON_KEY: skeleton}))


def load_state(path: str | Path, fix: str) -> Any:
    """Read a state written by ``save_state``; anything else raises one line naming the file and ``fix``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        return _decode(json.loads(metadata[SKELETON_KEY]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ModelLoadError(f"{path}: not a readable training state ({reason}); {fix}") from exc
