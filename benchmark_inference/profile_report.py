"""The JSON report of a GPU profile script: sections measured one by one, each saved as soon as it is done.

A section that fails is recorded as ``{"failed": "..."}`` and the next one still runs, so one GPU
call returns everything that could be measured (``prefill_profile``, ``gemv_profile``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.results import atomic_write_json


class ProfileReport:
    """A dict of sections, rewritten to ``path`` after every section (``header``: device, torch, settings)."""

    def __init__(self, path: str | Path, device: torch.device, **header: Any):
        self.path = path
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.data: dict[str, Any] = {"device": name, "torch": torch.__version__, **header}

    def save(self, key: str, make: Callable[[], Any]) -> None:
        """Measure one section (``make()``), record it or its failure, write the file and print the row."""
        try:
            self.data[key] = make()
        except Exception as exc:  # noqa: BLE001 - report it, keep measuring the rest
            self.data[key] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        atomic_write_json(self.path, self.data)
        print(key, self.data[key], flush=True)
