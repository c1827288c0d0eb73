"""How two models share one GPU from two threads of one process: streams, priorities, SM slices.

``ConcurrencyOptions`` names one way to run the draft beside the target (``common.parallel``,
``benchmark_inference.concurrency_probe``):

- ``draft_priority``: CUDA stream priority of the draft's lane (negative = above the target's);
- ``graph_draft_prefill``: the draft's LLM prefill as one CUDA-graph replay (``enable_prefill_graphs``),
  so its ~500 launches need no interpreter-lock time while the target's thread launches its own;
- ``draft_sms`` / ``target_sms``: run that model in a green context of that many SMs
  (``torch.cuda.green_contexts``); a green context bounds its own work only, so SMs are kept free for
  the draft by putting the *target* in one (``target_sms`` < the card's SMs);
- ``head_start_s``: the target's lane starts this long after the draft's;
- ``switch_interval_s``: Python's thread switch interval while both lanes run (default 5 ms).

The default options are the plain two-threads, two-streams run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it runs, so ``--concurrency`` parses without it
    import torch


@dataclass(frozen=True)
class ConcurrencyOptions:
    """One way of running the draft beside the target on one GPU (see the module doc)."""

    draft_priority: int = 0
    graph_draft_prefill: bool = False
    draft_sms: int | None = None
    target_sms: int | None = None
    head_start_s: float = 0.0
    switch_interval_s: float | None = None

    def describe(self) -> dict[str, Any]:
        """The options as a plain dict (for result files)."""
        return asdict(self)


NAMED = {"threads": ConcurrencyOptions(),
         "draft_graphs": ConcurrencyOptions(draft_priority=-1, graph_draft_prefill=True)}


_FIELDS = {"priority": ("draft_priority", int), "graph_prefill": ("graph_draft_prefill", lambda v: bool(int(v))),
           "draft_sms": ("draft_sms", int), "target_sms": ("target_sms", int),
           "head_start_ms": ("head_start_s", lambda v: float(v) / 1000),
           "switch_ms": ("switch_interval_s", lambda v: float(v) / 1000)}


def named_options(spec: str | None) -> ConcurrencyOptions:
    """The options of a ``--concurrency`` value: a name (``threads``, ``draft_graphs``), optionally followed by
    ``,key=value`` overrides (keys: priority, graph_prefill, draft_sms, target_sms, head_start_ms, switch_ms),
    e.g. ``draft_graphs,head_start_ms=20,target_sms=112``. None: ``threads``, the plain run."""
    name, *pairs = [p.strip() for p in (spec or "threads").split(",") if p.strip()] or ["threads"]
    if name not in NAMED:
        raise ValueError(f"--concurrency {spec!r}: unknown name {name!r}; start with one of {', '.join(NAMED)}")
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in _FIELDS or not value:
            raise ValueError(f"--concurrency {spec!r}: {pair!r} is not key=value with a key among {', '.join(_FIELDS)}")
        field_name, convert = _FIELDS[key]
        try:
            changes[field_name] = convert(value)
        except ValueError:
            raise ValueError(f"--concurrency {spec!r}: {key} takes a number, got {value!r}") from None
    return replace(NAMED[name], **changes)


_STREAMS: dict[tuple[str, str, int], Any] = {}
_GREEN: dict[tuple[str, int], Any] = {}


def lane_stream(device: torch.device, lane: str, priority: int = 0):
    """The CUDA stream of one lane on one device at ``priority``, made once and reused; None off CUDA.

    A fresh stream per sample would strand the caching allocator's blocks (they are kept per
    stream), so each sample would allocate anew.
    """
    if device.type != "cuda":
        return None
    import torch

    key = (str(device), lane, int(priority))
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=device, priority=int(priority))
    return _STREAMS[key]


def green_contexts_supported() -> bool:
    """Whether this torch build has ``torch.cuda.green_contexts`` and a CUDA device."""
    import torch

    try:
        from torch.cuda import green_contexts
    except ImportError:
        return False
    return bool(getattr(green_contexts, "SUPPORTED", False)) and torch.cuda.is_available()


@contextmanager
def green_context(device: torch.device, num_sms: int) -> Iterator[Any]:
    """Within the block this thread's CUDA work runs on ``num_sms`` SMs of ``device``; yields its stream.

    Uses the green context's own stream where torch offers one (``GreenContext.Stream``), else makes
    the green context current for this thread (its current stream becomes the context's). Contexts
    are made once per (device, SMs) and kept. Raises RuntimeError where green contexts are missing.
    """
    if device.type != "cuda" or not green_contexts_supported():
        raise RuntimeError("green contexts need a CUDA device and a torch built with them (torch.cuda.green_contexts)")
    import torch
    from torch.cuda.green_contexts import GreenContext

    key = (str(device), int(num_sms))
    if key not in _GREEN:
        ctx = GreenContext.create(num_sms=int(num_sms), device_id=device.index or 0)
        stream = ctx.Stream() if hasattr(ctx, "Stream") else None
        _GREEN[key] = (ctx, stream)
    ctx, stream = _GREEN[key]
    if stream is not None:
        with torch.cuda.stream(stream):
            yield stream
        return
    enter = getattr(ctx, "set_context", None) or ctx.make_current
    leave = getattr(ctx, "pop_context", None) or ctx.pop_current
    previous = torch.cuda.current_stream(device)
    enter()
    try:
        yield torch.cuda.current_stream(device)
    finally:
        leave()
        torch.cuda.set_stream(previous)  # whatever the green context made current, this thread's stream is back


@contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """Python's thread switch interval set to ``seconds`` within the block (None: unchanged)."""
    if seconds is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(float(seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def prepare_draft(draft: Any, options: ConcurrencyOptions) -> bool:
    """Turn on what ``options`` asks of the draft model (prefill graphs where possible); returns whether they are on.

    Never turns anything off: a draft whose prefill graphs are already on keeps them."""
    if not options.graph_draft_prefill or draft.device.type != "cuda" or draft.graphs is None:
        return draft.prefill_graphs is not None
    draft.enable_prefill_graphs()
    return True


@contextmanager
def draft_lane(device: torch.device, options: ConcurrencyOptions) -> Iterator[Any]:
    """The draft lane's stream for the block: a green context's when ``draft_sms``, else a priority stream."""
    with _lane(device, "draft", options.draft_sms, options.draft_priority) as stream:
        yield stream


@contextmanager
def target_lane(device: torch.device, options: ConcurrencyOptions) -> Iterator[Any]:
    """The target lane's stream for the block: a green context's when ``target_sms``, else its own stream."""
    with _lane(device, "target", options.target_sms, 0) as stream:
        yield stream


@contextmanager
def _lane(device: torch.device, lane: str, sms: int | None, priority: int) -> Iterator[Any]:
    if sms:
        with green_context(device, sms) as stream:
            yield stream
        return
    stream = lane_stream(device, lane, priority)
    if stream is None:
        yield None
        return
    import torch

    with torch.cuda.stream(stream):
        yield stream
