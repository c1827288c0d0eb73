"""Shared command-line flags, seeding and sharding for every stage script.

Every stage script builds its parser with :func:`add_common_args` so the flags are spelled
the same everywhere (underscores, as users already type them).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch and numpy load only when a function needs them, so --help prints fast
    import torch

QUANT_CHOICES = ("4bit", "8bit", "bf16", "fp16", "fp32")
EVENT_SOURCE_CHOICES = ("events", "images")  # common.data.EVENT_SOURCES (cli stays free of the data layer)
MAX_QUESTIONS_CHOICES = (1, 10, 50, 51)  # 51: also "What happened in this clip?" (--long_answers datasets)

T = TypeVar("T")


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a bad value gives argparse's one-line error naming the flag)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _int_at_least(0, text)


def add_retry_arg(group: Any) -> None:
    """``--retry_failed``: run the samples recorded as failed again (their failed records are replaced)."""
    group.add_argument(
        "--retry_failed", action="store_true",
        help="Run again the samples an earlier run recorded as failed (e.g. after fixing their files); "
             "their failed records are replaced. Default: off (failed samples are skipped on resume).",
    )


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
            "--max_samples", type=non_negative_int, default=None,
            help="Process at most this many samples. Default: None (all).",
        )
        g.add_argument(
            "--split", type=str, default=None,
            help="Dataset split to use (e.g. train, test). Default: None (the script's default).",
        )
        g.add_argument(
            "--max_questions", type=int, choices=MAX_QUESTIONS_CHOICES, default=1,
            help="Number of the most frequent questions asked per clip (1, 10, 50; 51 in --long_answers "
                 "datasets, whose 51st is 'What happened in this clip?'). Default: 1.",
        )
        g.add_argument(
            "--allow_pickle", action="store_true",
            help="Allow loading pickled .npy event files. Pickle can run arbitrary code: "
                 "use only for trusted upstream .npy files. Default: off.",
        )
        g.add_argument(
            "--event_source", choices=EVENT_SOURCE_CHOICES, default="events",
            help="Where EventGPT's event frames come from: 'events' renders them from the clip's events file "
                 "(what each record's event_data names); 'images' reads the stored event PNGs and refuses a "
                 "clip whose PNGs disagree with its events. Default: events.",
        )
        g.add_argument(
            "--num_chunks", type=positive_int, default=1,
            help="Split the samples into this many contiguous shards (for parallel jobs). Default: 1.",
        )
        g.add_argument(
            "--chunk_idx", type=non_negative_int, default=0,
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
        "--warmup_steps", type=non_negative_int, default=1,
        help="Untimed warm-up iterations before timing. Default: 1.",
    )
    return parser


# Flags that steer a run but do not shape its results (not compared on resume).
NOT_RESULT_SETTINGS = ("output_dir", "task_name", "resume", "retry_failed", "warmup_steps")


def result_settings(args: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """The flags that shape a run's results (all but output/progress flags), with ``resolved`` values
    (e.g. the dataset folder a default resolved to) in place of the raw ones."""
    out = {k: v for k, v in vars(args).items() if k not in NOT_RESULT_SETTINGS}
    out.update(resolved)
    return out


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device` ("auto"/None -> cuda if available, else cpu)."""
    import torch

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
    import numpy as np
    import torch

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


# --------------------------------------------------------------------------- entry point

DEBUG_FLAG = "--debug"


def expected_errors() -> tuple[type[BaseException], ...]:
    """The project's error types: bad input whose message already names the file or flag and the fix."""
    from common.errors import DataError
    from common.results import RunFolderError

    types: list[type[BaseException]] = [DataError, RunFolderError, FileNotFoundError]
    try:
        from common.models.errors import ModelLoadError
    except ImportError:  # the models package is optional for --help and for data-only tools
        pass
    else:
        types.append(ModelLoadError)
    return tuple(types)


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None,
            exit_code: Callable[[Any], int] | None = None) -> int:
    """Run a CLI's ``main(argv)`` the same way for every script; returns the exit code (also exits).

    Third-party noise is turned off (:mod:`common.quiet`); an expected error (see
    :func:`expected_errors`) prints ONE line ``error: <message>`` and exits with code 2; with
    ``--debug`` anywhere in the arguments the full traceback is shown and nothing is silenced.
    ``exit_code(result)`` turns what ``main`` returned into the exit status (e.g. 1 when every
    sample failed). Use as ``if __name__ == "__main__": run_cli(main)``.
    """
    from common.quiet import quiet_third_party

    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    quiet_third_party(debug=debug)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = main(args)
    except expected_errors() as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    code = exit_code(result) if exit_code is not None else 0
    if code:
        raise SystemExit(code)
    return 0


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message (first line), or its type name when it has none."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or 'not found'}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
