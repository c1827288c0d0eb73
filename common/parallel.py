"""Real concurrent prefill: the draft decodes "free" tokens while the target is still prefilling.

Two threads, each on its own CUDA stream (or its own GPU, or plain threads on CPU):

- target lane: stages 1-4 (load, preprocess, vision encode, LLM prefill), then it signals;
- draft lane: stages 1-4, then one-token draft steps until the target's signal (or a cap).

Every interval is recorded on one shared ``Clock``; the overlap window and the free tokens
are what this run measured, never a sum of separate runs. The speculative loop then starts
with the free tokens as its first proposal.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from common.concurrency import ConcurrencyOptions, draft_lane, prepare_draft, switch_interval
from common.concurrency import target_lane as target_stream
from common.pipeline import Prefilled, prefill_sample
from common.speculative import (
    Drafter,
    DrafterFactoryProtocol,
    DraftProposal,
    SpecResult,
    speculative_generate,
)
from common.timing import Clock
from common.timing import sync as device_sync
from common.tree import TreeConfig
from common.vlm import VisionLanguageModel


@dataclass
class ParallelOutcome:
    """What one concurrent prefill + speculative run measured."""

    result: SpecResult
    target: Prefilled
    draft: Prefilled
    free_tokens: list[int]
    intervals: list[dict[str, Any]]
    wall_seconds: float
    target_prefill_end: float  # seconds on the run's clock
    draft_prefill_end: float
    timings: dict[str, float] = field(default_factory=dict)
    drafter: Any = None

    @property
    def overlap_window(self) -> float:
        """Seconds between the draft's prefill end and the target's (the free-drafting window)."""
        return max(0.0, self.target_prefill_end - self.draft_prefill_end)

    @property
    def accepted_free_tokens(self) -> int:
        """How many of the free tokens the target accepted (first verify step)."""
        if not self.free_tokens or not self.result.iterations:
            return 0
        return int(self.result.iterations[0][1])


def _stream_sync(stream, device: torch.device):
    if stream is not None:
        return stream.synchronize
    if device.type == "cuda":
        return lambda: device_sync(device)
    return None


def run_parallel(draft: VisionLanguageModel, target: VisionLanguageModel, sample: Any,
                 make_drafter: DrafterFactoryProtocol, *, max_new_tokens: int, gamma: int, max_free_tokens: int = 64,
                 question: str | None = None, tree: TreeConfig | None = None,
                 concurrency: ConcurrencyOptions | None = None) -> ParallelOutcome:
    """Prefill both models concurrently, draft free tokens in the target's prefill window, then speculate.

    ``make_drafter(draft, draft_state, target) -> Drafter`` builds the drafter from the draft's
    fresh state (whose prefill keeps ``make_drafter.hidden_layers``); its one-token proposals during
    the window are the free tokens. ``target`` is what the engine verifies with: pass
    ``make_drafter.engine_target(vlm)``. ``tree``: after the free tokens, draft trees (common.tree)
    instead of chains. ``concurrency``: how the draft runs beside the target on one GPU
    (``common.concurrency``; default: two threads on two plain streams).
    """
    options = concurrency or ConcurrencyOptions()
    prepare_draft(draft, options)
    clock = Clock()
    target_done = threading.Event()
    box: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target_lane():
        try:
            if options.head_start_s > 0:
                time.sleep(options.head_start_s)
            with torch.no_grad(), target_stream(target.device, options) as t_stream:
                box["target"] = prefill_sample(target, sample, question, clock=clock, lane="target",
                                               stream=t_stream)
            box["target_end"] = clock.now()
        except BaseException as exc:  # surfaced in the caller
            errors.append(exc)
        finally:
            target_done.set()

    def run_draft():
        try:
            with torch.no_grad(), draft_lane(draft.device, options) as d_stream:
                pre = prefill_sample(draft, sample, question, clock=clock, lane="draft", stream=d_stream,
                                     hidden_layers=make_drafter.hidden_layers)
                box["draft"], box["draft_end"] = pre, clock.now()
                drafter: Drafter = make_drafter(draft, pre.state, target)
                free: list[int] = []
                sync = _stream_sync(d_stream, draft.device)
                while not target_done.is_set() and len(free) < max_free_tokens:
                    start = clock.now()
                    step = drafter.propose(list(free), 1).tokens
                    if sync:
                        sync()
                    clock.record("free draft", start, clock.now(), "draft")
                    if not step:
                        break
                    free.append(step[0])
                    if step[0] == target.eos_token_id:
                        break
                box["drafter"], box["free"] = drafter, free
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target_lane, name="target"), threading.Thread(target=run_draft, name="draft")]
    with switch_interval(options.switch_interval_s):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    for dev in {target.device, draft.device}:
        if dev.type == "cuda":
            device_sync(dev)
    free = box["free"]
    spec_start = clock.now()
    sync = _stream_sync(None, target.device)
    with torch.no_grad():
        result = speculative_generate(target, box["target"].state, box["drafter"], max_new_tokens=max_new_tokens,
                                      gamma=gamma, initial_proposal=DraftProposal(list(free)) if free else None,
                                      sync=sync, tree=tree)
    end = clock.now()
    clock.record("speculative decode", spec_start, end, "target")
    return ParallelOutcome(result=result, target=box["target"], draft=box["draft"], free_tokens=free,
                           intervals=clock.intervals, wall_seconds=end, target_prefill_end=box["target_end"],
                           draft_prefill_end=box["draft_end"], timings={"speculative_seconds": end - spec_start},
                           drafter=box["drafter"])


def timed(fn, device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with device synchronisation at both ends."""
    device_sync(device)
    start = time.perf_counter()
    out = fn()
    device_sync(device)
    return time.perf_counter() - start, out
