"""Drafter choice shared by the benchmarks: raw EventGPT, TokenAdapter or a hidden-state adapter.

Every drafter implements ``propose(context, gamma)`` (common.speculative.Drafter) and is
built per sample from the draft model's fresh prefill; the target verifies every proposal,
so all of them are lossless.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
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
from common.speculative import Drafter, ModelDrafter
from common.timing import sync_current_stream

DRAFTER_CHOICES = ("eventgpt", "token_adapter", "hidden_adapter", "eagle")


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    """``--drafter`` plus the adapter flags the issues name."""
    g = parser.add_argument_group("drafter")
    g.add_argument("--drafter", choices=DRAFTER_CHOICES, default=None,
                   help="what proposes tokens: raw EventGPT greedy tokens (default), the TokenAdapter, "
                        "or a hidden-state adapter through the target's LM head")
    g.add_argument("--use_token_adapter", action="store_true",
                   help="same as --drafter token_adapter")
    g.add_argument("--token_adapter_path", default=None,
                   help="TokenAdapter checkpoint or run folder (default: the latest under token_alignment/task)")
    g.add_argument("--hidden_adapter", default=None,
                   help="hidden-state adapter checkpoint (L1-L5); implies --drafter hidden_adapter")
    g.add_argument("--eagle_head", default=None,
                   help="EAGLE-style head over Video-LLaVA's own features (python -m feature_alignment."
                        "train_eagle_head); implies --drafter eagle")


@dataclass
class DrafterFactory:
    """Builds the chosen drafter for one sample; ``hidden_layers`` tells the draft's prefill what to keep."""

    kind: str
    adapter: Any = None
    hidden_layers: list[int] = field(default_factory=list)

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


def drafter_factory(args: argparse.Namespace, device: Any = "cpu") -> DrafterFactory:
    """Resolve the drafter flags (loading an adapter once) into a per-sample factory."""
    kind = args.drafter or ("eagle" if args.eagle_head else "hidden_adapter" if args.hidden_adapter else
                            "token_adapter" if args.use_token_adapter else "eventgpt")
    if kind == "token_adapter":
        egpt, vllava = resolve_model_paths(args.eventgpt_path, args.videollava_path)
        path = args.token_adapter_path or find_latest_adapter(eventgpt_path=egpt, videollava_path=vllava)
        if path is None:
            raise SystemExit("no TokenAdapter for this model pair under token_alignment/task: train one "
                             "(python -m token_alignment.train_and_evaluate) or pass --token_adapter_path")
        return DrafterFactory(kind, adapter=load_token_adapter(path, device))
    if kind == "hidden_adapter":
        if not args.hidden_adapter:
            raise SystemExit("--drafter hidden_adapter needs --hidden_adapter PATH (an L1-L5 checkpoint)")
        adapter = load_any_adapter(args.hidden_adapter, device)
        return DrafterFactory(kind, adapter=adapter, hidden_layers=adapter_input_layers(adapter))
    if kind == "eagle":
        if not args.eagle_head:
            raise SystemExit("--drafter eagle needs --eagle_head PATH (python -m feature_alignment.train_eagle_head)")
        return DrafterFactory(kind, adapter=load_eagle_head(args.eagle_head))
    return DrafterFactory(kind)


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
