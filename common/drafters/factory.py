"""Drafter choice shared by the benchmarks: raw EventGPT, TokenAdapter or a hidden-state adapter.

Every drafter implements ``propose(context, gamma)`` (common.speculative.Drafter) and is
built per sample from the draft model's fresh prefill; the target verifies every proposal,
so all of them are lossless.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from common.defaults import resolve_model_paths
from common.drafters.eagle_head import EagleTarget, load_eagle_head, make_eagle_drafter
from common.drafters.hidden_adapter import load_any_adapter
from common.drafters.hidden_drafter import adapter_input_layers, load_hidden_adapter_drafter
from common.drafters.token_drafter import (
    aligned_metrics,
    find_latest_adapter,
    load_token_adapter,
    load_token_adapter_drafter,
)
from common.flags import DRAFTER_CHOICES, add_drafter_args, add_token_adapter_flag  # noqa: F401  (re-exported)
from common.results import atomic_write_json, read_json
from common.speculative import Drafter, ModelDrafter
from common.timing import sync_current_stream


@dataclass(frozen=True)
class DrafterChoice:
    """Which drafter a benchmark runs and from which checkpoint (None: the default for the kind).

    ``eventgpt_path``/``videollava_path`` pick the latest TokenAdapter trained on that pair."""

    kind: str = "eventgpt"
    token_adapter: str | None = None
    hidden_adapter: str | None = None
    eagle_head: str | None = None
    eventgpt_path: str | None = None
    videollava_path: str | None = None


def drafter_choice(args: argparse.Namespace) -> DrafterChoice:
    """The :class:`DrafterChoice` of the flags from :func:`add_drafter_args` (a checkpoint flag implies its kind)."""
    kind = args.drafter or ("eagle" if args.eagle_head else "hidden_adapter" if args.hidden_adapter else "eventgpt")
    return DrafterChoice(kind=kind, token_adapter=args.token_adapter_path, hidden_adapter=args.hidden_adapter,
                         eagle_head=args.eagle_head, eventgpt_path=args.eventgpt_path,
                         videollava_path=args.videollava_path)


@dataclass
class DrafterFactory:
    """Builds the chosen drafter for one sample; ``hidden_layers`` tells the draft's prefill what to keep."""

    kind: str
    adapter: Any = None
    hidden_layers: list[int] = field(default_factory=list)
    checkpoint: str | None = None  # where ``adapter`` was loaded from

    def engine_target(self, target: Any) -> Any:
        """The object the engine verifies with: for EAGLE a fresh wrapper recording the target's
        features on every forward (the head drafts from them); the target itself otherwise."""
        if self.kind != "eagle":
            return target
        return EagleTarget(target, self.adapter.config.feature_layer)

    def __call__(self, draft: Any, draft_state: Any, target: Any) -> Drafter:
        limit = min(draft.base_vocab_size, target.base_vocab_size)
        draft_sync = partial(sync_current_stream, draft.device)
        if self.kind == "token_adapter":
            return load_token_adapter_drafter(self.adapter, draft, draft_state, limit, sync=draft_sync,
                                              stop_token_ids=[target.eos_token_id])
        if self.kind == "hidden_adapter":
            return load_hidden_adapter_drafter(self.adapter, draft, draft_state, target, sync=draft_sync)
        if self.kind == "eagle":  # ``target`` is the wrapper from engine_target; no draft model is used
            return make_eagle_drafter(self.adapter, None, target, None,
                                      sync=partial(sync_current_stream, target.device))
        return ModelDrafter(draft, draft_state, vocab_limit=limit, target_vocab_size=target.vocab_size,
                            name="eventgpt", sync=draft_sync)


def build_drafter_factory(choice: DrafterChoice, device: Any = "cpu") -> DrafterFactory:
    """Load the chosen drafter's checkpoint once into a per-sample factory (``checkpoint`` says which)."""
    kind = choice.kind
    if kind == "token_adapter":
        egpt, vllava = resolve_model_paths(choice.eventgpt_path, choice.videollava_path)
        path = choice.token_adapter or find_latest_adapter(eventgpt_path=egpt, videollava_path=vllava)
        if path is None:
            raise SystemExit("no TokenAdapter for this model pair under token_alignment/task: train one "
                             "(python -m token_alignment.train_and_evaluate) or pass --token_adapter PATH")
        return DrafterFactory(kind, adapter=load_token_adapter(path, device), checkpoint=str(path))
    if kind == "hidden_adapter":
        if not choice.hidden_adapter:
            raise SystemExit("--drafter hidden_adapter needs --hidden_adapter PATH (an L1-L5 checkpoint)")
        adapter = load_any_adapter(choice.hidden_adapter, device)
        return DrafterFactory(kind, adapter=adapter, hidden_layers=adapter_input_layers(adapter),
                              checkpoint=str(choice.hidden_adapter))
    if kind == "eagle":
        if not choice.eagle_head:
            raise SystemExit("--drafter eagle needs --eagle_head PATH (python -m feature_alignment.train_eagle_head)")
        return DrafterFactory(kind, adapter=load_eagle_head(choice.eagle_head), checkpoint=str(choice.eagle_head))
    return DrafterFactory(kind)


def drafter_factory(args: argparse.Namespace, device: Any = "cpu") -> DrafterFactory:
    """:func:`build_drafter_factory` from a benchmark's flags (see :func:`add_drafter_args`)."""
    return build_drafter_factory(drafter_choice(args), device)


def record_drafter(config_path: str | Path, factory: DrafterFactory) -> None:
    """Add the drafter's kind and checkpoint (e.g. the latest TokenAdapter picked) to a run's config.json."""
    path = Path(config_path)
    config = read_json(path) if path.is_file() else {}
    config["drafter"] = {"kind": factory.kind, "checkpoint": factory.checkpoint}
    atomic_write_json(path, config)


def aligned_fields(factory: DrafterFactory, drafter: Any, result: Any, raw_result: Any) -> dict[str, Any]:
    """Per-sample fields behind the TokenAdapter's aligned metrics (empty for other drafters)."""
    if factory.kind != "token_adapter":
        return {}
    annotated = drafter.annotate(result)
    return {"aligned_top5_rate": annotated.get("top5_rate"), "raw_acceptance_rate": raw_result.acceptance_rate,
            "raw_mean_accepted_length": raw_result.mean_accepted_length}


def aligned_statistics(records: list[dict[str, Any]], rate_key: str, length_key: str) -> dict[str, Any]:
    """``aligned_acceptance_rate_avg/std``, ``aligned_top5_rate_avg``, ``aligned_improvement``, ... over records."""
    rows = [r for r in records if "raw_acceptance_rate" in r]
    if not rows:
        return {}
    return aligned_metrics(
        ({"acceptance_rate": r["raw_acceptance_rate"], "mean_accepted_length": r["raw_mean_accepted_length"]},
         {"acceptance_rate": r[rate_key], "mean_accepted_length": r[length_key],
          "top5_rate": r.get("aligned_top5_rate")}) for r in rows)
