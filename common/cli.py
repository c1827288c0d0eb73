"""Shared command-line flags, seeding and sharding for every stage script.

Every stage script builds its parser with :func:`add_common_args` so the flags are spelled
the same everywhere (underscores, as users already type them).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

QUANT_CHOICES = ("4bit", "8bit", "bf16", "fp16", "fp32")
MAX_QUESTIONS_CHOICES = (1, 10, 50)

T = TypeVar("T")


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    models: bool = True,
    data: bool = True,
    output: bool = True,
) -> argparse.ArgumentParser:
    """Add the shared flags to ``parser`` (in groups) and return it.

    ``models`` adds the model/precision/device flags, ``data`` the dataset and sharding
    flags, ``output`` the output/run-control flags. ``--seed`` and ``--warmup_steps`` are
    always added.
    """
    if data:
        g = parser.add_argument_group("data")
        g.add_argument(
            "--dataset_dir", type=str, default=None,
            help="Clip dataset folder (index JSON, event_npy/, mp4/, ...). "
                 "Default: None, the script resolves its own default.",
        )
        g.add_argument(
            "--max_samples", type=int, default=None,
            help="Process at most this many samples. Default: None (all).",
        )
        g.add_argument(
            "--split", type=str, default=None,
            help="Dataset split to use (e.g. train, test). Default: None (the script's default).",
        )
        g.add_argument(
            "--max_questions", type=int, choices=MAX_QUESTIONS_CHOICES, default=1,
            help="Number of the most frequent questions asked per clip (1, 10 or 50). Default: 1.",
        )
        g.add_argument(
            "--allow_pickle", action="store_true",
            help="Allow loading pickled .npy event files. Pickle can run arbitrary code: "
                 "use only for trusted upstream .npy files. Default: off.",
        )
        g.add_argument(
            "--num_chunks", type=int, default=1,
            help="Split the samples into this many contiguous shards (for parallel jobs). Default: 1.",
        )
        g.add_argument(
            "--chunk_idx", type=int, default=0,
            help="Which shard (0-based, < --num_chunks) this run processes. Default: 0.",
        )
    if models:
        g = parser.add_argument_group("models")
        g.add_argument(
            "--eventgpt_path", type=str, default=None,
            help="EventGPT (draft) checkpoint folder. Default: None (the default shipped pair).",
        )
        g.add_argument(
            "--videollava_path", type=str, default=None,
            help="Video-LLaVA (target) checkpoint folder or hub id. Default: None (the default shipped pair).",
        )
        g.add_argument(
            "--quant", type=str, choices=QUANT_CHOICES, default=None,
            help="Model precision / quantization. Default: None -> bf16 on CUDA, fp32 on CPU.",
        )
        g.add_argument(
            "--device", type=str, default="auto",
            help="Torch device (cuda, cuda:1, cpu, ...). Default: auto (cuda if available, else cpu).",
        )
    if output:
        g = parser.add_argument_group("output")
        g.add_argument(
            "--output_dir", type=str, default=None,
            help="Base folder for run folders. Default: None -> results/<stage> under the current directory.",
        )
        g.add_argument(
            "--task_name", type=str, default=None,
            help="Name of this run; the run folder is <output_dir>/<task_name>_<timestamp>. "
                 "Default: None (the script's default).",
        )
        g.add_argument(
            "--resume", dest="resume", action="store_true", default=True,
            help="Continue the newest unfinished run folder of the same task_name. Default: on.",
        )
        g.add_argument(
            "--no_resume", dest="resume", action="store_false",
            help="Always start a new run folder (turns --resume off).",
        )
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="Random seed for random, numpy and torch. Default: 0.")
    g.add_argument(
        "--warmup_steps", type=int, default=1,
        help="Untimed warm-up iterations before timing. Default: 1.",
    )
    return parser


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device` ("auto"/None -> cuda if available, else cpu)."""
    if isinstance(name, torch.device):
        return name
    if name is None or str(name).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_quant(args: argparse.Namespace | Any) -> str:
    """Return ``args.quant``, or the default for the resolved device: "bf16" on CUDA, "fp32" otherwise."""
    quant = getattr(args, "quant", None)
    if quant:
        if quant not in QUANT_CHOICES:
            raise ValueError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
        return quant
    device = resolve_device(getattr(args, "device", "auto"))
    return "bf16" if device.type == "cuda" else "fp32"


def set_seed(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def shard(items: Sequence[T], num_chunks: int = 1, chunk_idx: int = 0) -> list[T]:
    """Return the ``chunk_idx``-th of ``num_chunks`` contiguous slices of ``items``.

    Deterministic and order preserving; chunk sizes differ by at most one (the first
    ``len(items) % num_chunks`` chunks get the extra item). Concatenating all chunks in
    order gives back ``items``.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    items = list(items)
    base, extra = divmod(len(items), num_chunks)
    start = chunk_idx * base + min(chunk_idx, extra)
    stop = start + base + (1 if chunk_idx < extra else 0)
    return items[start:stop]


class DeprecatedFlag(argparse.Action):
    """An old spelling that keeps working: stores what ``use`` would store and prints one deprecation line.

    ``nargs=0`` with ``const``: a switch (``--use_token_adapter`` stores ``const`` in ``dest``).
    """

    def __init__(self, option_strings: list[str], dest: str, use: str, nargs: int | str | None = None,
                 const: Any = None, **kwargs: Any):
        self.use = use
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"deprecated: {option_string} still works but will go; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
