"""Per-sample stage pipeline shared by the benchmarks: load both models, time the five stages.

Stages (synchronised timers): 1 data load, 2 preprocess, 3 vision encode, 4 LLM prefill,
5 decode. Keys follow the users' names: ``<model>_stage{N}_time`` with model ``egpt`` or
``videollava``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.cli import result_settings
from common.data import default_frame_cache
from common.defaults import resolve_model_paths
from common.drafters.factory import DrafterFactory, drafter_factory
from common.errors import DataError
from common.flags import add_decode_args  # noqa: F401  (re-exported: the flags live there)
from common.harness import RunSettings, pin_cpu_threads
from common.models.loader import load_vlm
from common.speculative import autoregressive_generate
from common.timing import Clock, sync
from common.vlm import DecodeState, VisionLanguageModel

STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
STAGE_NAMES = {"stage1": "data load", "stage2": "preprocess", "stage3": "vision encode",
               "stage4": "LLM prefill", "stage5": "decode"}


@dataclass
class Prefilled:
    """A model after stages 1-4: its decoding state and the stage times (seconds)."""

    state: DecodeState
    times: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairConfig:
    """Where and how to load the model pair. Paths default to the embedded pair; a per-model
    device overrides ``device``. How a sample is read (``allow_pickle``, the frame cache) is the
    data source's setting, carried by each sample (:class:`common.data.ClipDataset`)."""

    eventgpt_path: str | None = None
    videollava_path: str | None = None
    quant: str | None = None
    device: str | None = None
    draft_device: str | None = None
    target_device: str | None = None


def load_pair(config: PairConfig | argparse.Namespace, dataset_dir: Any = None
              ) -> tuple[VisionLanguageModel, VisionLanguageModel]:
    """(EventGPT draft, Video-LLaVA target) as ``config`` says, defaulting to the embedded pair.

    A CLI's parsed flags are accepted too (converted by :func:`pair_config`). ``dataset_dir`` is
    unused (kept for existing callers): samples carry their dataset's reading settings.
    """
    del dataset_dir
    if not isinstance(config, PairConfig):
        config = pair_config(config)
    egpt_path, vllava_path = resolve_model_paths(config.eventgpt_path, config.videollava_path)
    draft = load_vlm("eventgpt", egpt_path, quant=config.quant, device=config.draft_device or config.device)
    target = load_vlm("videollava", vllava_path, quant=config.quant, device=config.target_device or config.device)
    return draft, target


def pair_config(args: argparse.Namespace) -> PairConfig:
    """The :class:`PairConfig` of a CLI's flags (``--draft_device``/``--target_device`` where it has them)."""
    flags = vars(args)
    return PairConfig(eventgpt_path=flags.get("eventgpt_path"), videollava_path=flags.get("videollava_path"),
                      quant=flags.get("quant"), device=flags.get("device"), draft_device=flags.get("draft_device"),
                      target_device=flags.get("target_device"))


def prefill_sample(vlm: VisionLanguageModel, sample: Any, question: str | None = None, hidden_layers=(),
                   clock: Clock | None = None, lane: str | None = None, stream: Any = None) -> Prefilled:
    """Stages 1-4 for one model, each timed on ``clock``'s timeline.

    Timers synchronise ``stream`` when given (so a concurrent model on another stream keeps
    running), else the whole device.
    """
    clock = clock or Clock()
    lane = lane or vlm.name
    spans = {}
    with torch.no_grad():
        with clock.span("stage1", lane, stream=stream, device=vlm.device) as spans["stage1"]:
            raw = vlm.load_visual(sample)
        with clock.span("stage2", lane, stream=stream, device=vlm.device) as spans["stage2"]:
            pixels = vlm.preprocess(raw)
        with clock.span("stage3", lane, stream=stream, device=vlm.device) as spans["stage3"]:
            visual = vlm.encode_pixels(pixels)
        with clock.span("stage4", lane, stream=stream, device=vlm.device) as spans["stage4"]:
            state = vlm.prefill(visual, question or sample.question, hidden_layers=hidden_layers)
    return Prefilled(state, {k: v["end"] - v["start"] for k, v in spans.items()})


def run_model(vlm: VisionLanguageModel, sample: Any, prefix: str, max_new_tokens: int) -> dict[str, Any]:
    """All five stages for one model; returns the per-sample fields of that model."""
    pre = prefill_sample(vlm, sample)
    gen = autoregressive_generate(vlm, pre.state, max_new_tokens=max_new_tokens, sync=lambda: sync(vlm.device))
    times = {**pre.times, "stage5": gen.seconds}
    record: dict[str, Any] = {f"{prefix}_{stage}_time": times[stage] for stage in STAGES}
    record[prefix] = vlm.decode_text(gen.tokens)
    record[f"{prefix}_token_ids"] = list(gen.tokens)
    record[f"{prefix}_time"] = sum(times.values())
    record[f"{prefix}_num_tokens"] = len(gen.tokens)
    record[f"{prefix}_decode_ms_per_token"] = 1000 * gen.seconds / max(gen.steps, 1)
    return record


def _resolved(path: Any) -> str:
    """An existing path made absolute (hub ids stay as they are)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def prepare_benchmark(stage: str, args: argparse.Namespace, argv: list[str], default_task: str, lanes: int = 1
                      ) -> tuple[Any, list[Any], RunSettings]:
    """What every benchmark does first: logging, seed, torch threads pinned on a CPU, dataset (default
    if none), this shard's samples, and the typed run settings. Returns (dataset_dir, samples, settings).

    ``lanes``: models that run at once (2 for the concurrent benchmarks: each gets half the cores).
    """
    from common.cli import resolve_device, resolve_quant, set_seed, shard
    from common.data import ClipDataset
    from common.defaults import resolve_dataset_dir, resolve_split

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_seed(args.seed)
    device = resolve_device(getattr(args, "target_device", None) or args.device)
    threads = pin_cpu_threads(device, lanes)
    dataset_dir = resolve_dataset_dir(args.dataset_dir)
    args.split = resolve_split(args.dataset_dir, args.split)  # the embedded default: its test split
    dataset = ClipDataset(dataset_dir, split=args.split, max_questions=args.max_questions,
                          allow_pickle=args.allow_pickle, event_source=args.event_source,
                          frame_cache_dir=default_frame_cache(dataset_dir).cache_dir)
    samples = shard(list(dataset), args.num_chunks, args.chunk_idx)[: args.max_samples]
    egpt_path, vllava_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    settings = result_settings(args, dataset_dir=_resolved(dataset_dir), eventgpt_path=_resolved(egpt_path),
                               videollava_path=_resolved(vllava_path), quant=resolve_quant(args))
    run = RunSettings(stage=stage, task_name=args.task_name or default_task, settings=settings,
                      config={**vars(args), "torch_threads_per_lane": threads, "lanes": lanes}, argv=argv,
                      output_dir=args.output_dir, resume=args.resume, retry_failed=args.retry_failed,
                      warmup_steps=args.warmup_steps, num_chunks=args.num_chunks, chunk_idx=args.chunk_idx,
                      device=str(device), quant=settings["quant"], torch_threads=threads,
                      desc=f"{stage} ({default_task})")
    return dataset_dir, samples, run


def check_context(vlm: VisionLanguageModel, max_new_tokens: int) -> None:
    """Refuse a ``--max_new_tokens`` that cannot fit in the model's context (prompt + new tokens)."""
    config = getattr(vlm.model, "config", None)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_new_tokens >= limit:
        raise DataError(f"--max_new_tokens {max_new_tokens} does not fit {vlm.name}'s context of {limit} positions "
                        "(prompt + new tokens); pass a smaller --max_new_tokens")


def load_benchmark_pair(args: argparse.Namespace, dataset_dir: Any
                        ) -> tuple[VisionLanguageModel, VisionLanguageModel, str, DrafterFactory]:
    """The pair of a one-drafter benchmark, ready to run: loaded, checked against ``--max_new_tokens``,
    decoding configured (``--decode_mode``, graphed vision towers unless ``--eager_vision``), and the
    drafter factory of the flags. Returns (draft, target, decode mode, drafter factory)."""
    draft, target = load_pair(args, dataset_dir)
    for vlm in (draft, target):
        check_context(vlm, args.max_new_tokens)
    mode = configure_decode((draft, target), args.decode_mode, max_length=4096, gamma=args.gamma,
                            vision_graphs=not args.eager_vision, tree_tokens=tree_tokens(args))
    return draft, target, mode, drafter_factory(args, device=target.device)


def tree_tokens(args: argparse.Namespace) -> int | None:
    """``--tree_tokens`` when draft trees are on (both tree flags given), else None."""
    topk, tokens = getattr(args, "tree_topk", None), getattr(args, "tree_tokens", None)
    return int(tokens) if topk is not None and tokens is not None else None


def configure_decode(models, mode: str, max_length: int, gamma: int, vision_graphs: bool = True,
                     tree_tokens: int | None = None) -> str:
    """Turn on CUDA-graph decoding (and graphed vision towers) where asked for and possible; returns the mode.

    ``tree_tokens``: draft trees of that many rows are verified too (their step and tree graph captured).
    """
    if mode == "auto":
        mode = "cuda_graph" if all(m.device.type == "cuda" for m in models) else "eager"
    if mode == "eager":
        return mode
    sizes = (1, gamma + 1, *([tree_tokens] if tree_tokens else []))
    for m in models:
        m.enable_cuda_graphs(max_length, step_sizes=sizes, compile=mode == "compiled_graph", tree_step=tree_tokens)
        if vision_graphs:
            m.enable_vision_graphs()
    return mode


@contextmanager
def lossless_numerics(target: VisionLanguageModel, args: argparse.Namespace) -> Iterator[int | None]:
    """Within the block the target runs fixed (gamma+1)-token steps, when graphs allow; yields the step or None.

    With draft trees on (``tree_tokens``) the fixed step is ``--tree_tokens`` rows: a tree verify then
    replays the tree graph of that size, bit for bit the target's own fixed-step decode.
    """
    decoding = target.decoding
    verify = tree_tokens(args) or args.gamma + 1
    step = verify if decoding.graphs is not None and args.lossless_reference == "fixed_step" else None
    previous = decoding.fixed_step
    decoding.use_fixed_step(step)
    try:
        yield step
    finally:
        decoding.use_fixed_step(previous)


def time_target_alone(target: VisionLanguageModel, sample: Any, max_new_tokens: int) -> tuple[float, Prefilled, Any]:
    """The baseline of every speculative benchmark: stages 1-4 and greedy decoding of the target by itself.

    Returns (wall seconds, synchronised at both ends; the prefill with its stage times; the generation).
    """
    sync(target.device)
    start = time.perf_counter()
    pre = prefill_sample(target, sample)
    gen = autoregressive_generate(target, pre.state, max_new_tokens=max_new_tokens, sync=lambda: sync(target.device))
    sync(target.device)
    return time.perf_counter() - start, pre, gen


def reference_tokens(target: VisionLanguageModel, sample: Any, max_new_tokens: int) -> list[int]:
    """The target's own greedy output under its current numerics (untimed)."""
    state = prefill_sample(target, sample).state
    return list(autoregressive_generate(target, state, max_new_tokens=max_new_tokens).tokens)


def token_match_rate(draft_ids: list[int], target_ids: list[int]) -> dict[str, float | int]:
    """Index-aligned agreement of two outputs (the raw "acceptance" of prior work) and the matching prefix."""
    n = len(target_ids)
    matches = sum(1 for a, b in zip(draft_ids, target_ids) if a == b)
    prefix = 0
    for a, b in zip(draft_ids, target_ids):
        if a != b:
            break
        prefix += 1
    return {"acceptance_rate": matches / n if n else 0.0, "matching_prefix": prefix}
