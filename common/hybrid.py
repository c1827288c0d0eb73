"""Hybrid drafting: EventGPT's free tokens during the target's prefill, then a cheap head for the rest.

EventGPT costs about a target step per draft token once the target is decoding (c ~ 1), so its
only cheap tokens are the ones it drafts while the target is still prefilling its long video
prompt. A draft head over the target's own features (EAGLE, c ~ 0.05) pays off during
decoding but has nothing to read before the target's prefill ends. The hybrid uses each where
it is cheap:

- phase 1 (while the target is still prefilling: its state does not exist yet): raw EventGPT
  greedy tokens (``ModelDrafter``), i.e. the free tokens of ``run_parallel``;
- phase 2 (from the moment the target's prefill is done): the EAGLE head over the target's features (``variant="eagle"``), or the L5
  adapter conditioned on EventGPT's features (``variant="l5"``: the
  ``EagleAdapter`` through ``load_hidden_adapter_drafter``).

    factory = HybridFactory.eagle(head)                    # or HybridFactory.l5(adapter)
    outcome = run_hybrid(eventgpt, videollava, sample, factory, max_new_tokens=50, gamma=5)

The target verifies every token, so the output is the target's own (lossless).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from common.drafters.eagle_head import EagleTarget, make_eagle_drafter
from common.drafters.hidden_drafter import adapter_input_layers, load_hidden_adapter_drafter
from common.parallel import ParallelOutcome, run_parallel
from common.speculative import DraftProposal, ModelDrafter
from common.timing import sync_current_stream
from common.tree import DraftTree, TreeConfig, propose_tree

__all__ = ["HybridDrafter", "HybridFactory", "run_hybrid"]


class HybridDrafter:
    """``first`` while the target has no state yet (its prefill is running), then ``second``.

    ``proxy`` is the target wrapper the engine verifies with (:class:`common.drafters.eagle_head.EagleTarget`),
    fresh for this generation: its ``last_state`` appears when the target's prefill is done (its device
    work finished: the switch may come in ``run_parallel``'s draft lane, on another stream). ``on_switch`` runs once
    at the switch (e.g. rolling the shared draft cache back for the second drafter).
    ``stats`` sums both drafters' counters and records where the switch happened.
    """

    def __init__(self, first: Any, second: Any, proxy: Any, *, on_switch: Any = None, name: str = "hybrid"):
        self.first, self.second, self.proxy = first, second, proxy
        self.on_switch = on_switch
        self.name = name
        self.switched_at: int | None = None
        self.phase_tokens = {"first": 0, "second": 0}

    def _decoding(self) -> bool:
        return self.proxy.last_state is not None

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in (self.first, self.second):
            for k, v in part.stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        out.setdefault("steps", 0)
        out["switched_at"] = self.switched_at
        out["first_tokens"], out["second_tokens"] = self.phase_tokens["first"], self.phase_tokens["second"]
        return out

    def propose_tree(self, context: list[int], config: TreeConfig, max_depth: int) -> DraftTree:
        """A draft tree from the second drafter (the engine asks for trees only after the target's prefill)."""
        self._maybe_switch(context)
        tree = propose_tree(self.second, context, config, max_depth)
        self.phase_tokens["second"] += len(tree)
        return tree

    def _maybe_switch(self, context: list[int]) -> None:
        if self.switched_at is None and self._decoding():
            self.switched_at = len(context)
            if self.on_switch is not None:
                self.on_switch()

    def propose(self, context: list[int], gamma: int) -> DraftProposal:
        self._maybe_switch(context)
        phase = "first" if self.switched_at is None else "second"
        proposal = (self.first if phase == "first" else self.second).propose(context, gamma)
        self.phase_tokens[phase] += len(proposal.tokens)
        return proposal


class HybridFactory:
    """Per-sample builder of a :class:`HybridDrafter` for ``run_parallel``/``run_hybrid``.

    Called as ``factory(draft, draft_state, target)`` where ``target`` is the EagleTarget wrapper
    (``run_hybrid`` makes one per run). ``hidden_layers`` are the EventGPT layers its prefill
    must keep (the L5 adapter's input layer); ``feature_layer`` the target layer to record
    (None for the L5 variant, which reads EventGPT's features instead).
    """

    def __init__(self, variant: str, head: Any = None, adapter: Any = None, name: str | None = None):
        if variant not in ("eagle", "l5"):
            raise ValueError(f"hybrid variant must be 'eagle' or 'l5', got {variant!r}")
        self.variant, self.head, self.adapter = variant, head, adapter
        self.kind = name or ("hybrid" if variant == "eagle" else "hybrid_L5")
        self.hidden_layers: list[int] = []
        self.feature_layer: int | None = None
        if variant == "eagle":
            if head is None:
                raise ValueError("the eagle hybrid needs an EAGLE head")
            self.feature_layer = int(head.config.feature_layer)
        else:
            if adapter is None:
                raise ValueError("the l5 hybrid needs an L5 adapter")
            self.hidden_layers = adapter_input_layers(adapter)

    def engine_target(self, target: Any) -> EagleTarget:
        """A fresh wrapper recording ``feature_layer`` (nothing for the L5 variant) on every target forward:
        the switch happens when its prefilled state appears."""
        return EagleTarget(target, self.feature_layer)

    @classmethod
    def eagle(cls, head: Any, name: str | None = None) -> HybridFactory:
        return cls("eagle", head=head, name=name)

    @classmethod
    def l5(cls, adapter: Any, name: str | None = None) -> HybridFactory:
        return cls("l5", adapter=adapter, name=name)

    def __call__(self, draft: Any, draft_state: Any, target: Any) -> HybridDrafter:
        limit = min(int(draft.base_vocab_size), int(target.base_vocab_size))
        draft_sync = partial(sync_current_stream, draft.device)
        first = ModelDrafter(draft, draft_state, vocab_limit=limit, target_vocab_size=int(target.vocab_size),
                             name="eventgpt", sync=draft_sync)
        if self.variant == "eagle":
            second = make_eagle_drafter(self.head, None, target, None,
                                        sync=partial(sync_current_stream, target.device))
            return HybridDrafter(first, second, target, name=self.kind)
        second = load_hidden_adapter_drafter(self.adapter, draft, draft_state, target, sync=draft_sync)

        def rollback() -> None:  # the free tokens sit in the shared draft cache; the adapter drafter starts clean
            draft.truncate(draft_state, draft_state.prompt_length)

        return HybridDrafter(first, second, target, on_switch=rollback, name=self.kind)


def run_hybrid(draft: Any, target: Any, sample: Any, factory: HybridFactory, *, max_new_tokens: int, gamma: int,
               max_free_tokens: int = 64, question: str | None = None, tree: TreeConfig | None = None,
               ) -> ParallelOutcome:
    """``run_parallel`` with the hybrid: a fresh EagleTarget wrapper around ``target`` for this run.

    The outcome's ``result`` is the target's own output; ``free_tokens`` are EventGPT's; the
    drafter (``outcome.drafter``) tells where the switch happened.
    """
    return run_parallel(draft, factory.engine_target(target), sample, factory, max_new_tokens=max_new_tokens,
                        gamma=gamma, max_free_tokens=max_free_tokens, question=question, tree=tree)
