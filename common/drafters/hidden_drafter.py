"""Feature drafting for the speculative engine: EventGPT states -> adapter -> Video-LLaVA's LM head.

:class:`HiddenAdapterDrafter` implements the engine's ``Drafter`` protocol
(``propose(context, gamma) -> DraftProposal``). It keeps EventGPT's KV cache in sync with the
accepted context as ``ModelDrafter`` does (longest common prefix kept, the cache rolled back,
the missing tokens fed in one forward), but asks EventGPT for its hidden state at the
adapter's input layer instead of its logits, maps the states through the adapter into
Video-LLaVA's space and proposes the argmax of Video-LLaVA's own LM head (EAGLE-style).

- L1-L4: every draft token costs one EventGPT forward (the drafted token is fed to get the
  next state), like ``ModelDrafter``; L4 attends over the whole history of states.
- L5: the first token comes from the aligned current state; the next ``gamma - 1`` come from
  the adapter's own next-feature prediction (feature -> LM head -> token -> next feature),
  with no further EventGPT forwards.

The target verifies every proposal, so the output is the target's own (lossless). Ids at or
above the shared base vocabulary are never proposed, and target ids outside it are fed to
EventGPT as its unk token.

Wiring (benchmarks)::

    layers = adapter_input_layers(path)                       # e.g. [-1]
    draft_state = draft.prefill(draft_visual, question, hidden_layers=layers)
    drafter = load_hidden_adapter_drafter(path, draft, draft_state, target)
    result = speculative_generate(target, target_state, drafter, max_new_tokens=..., gamma=...)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from common.drafters.draft_graphs import cut_after_stop, pick_chain_mode, plain_weights
from common.drafters.hidden_adapter import BaseAdapter, load_any_adapter, masked_logits, read_adapter_meta
from common.speculative import DraftProposal, SyncedDrafter

__all__ = ["HiddenAdapterDrafter", "load_hidden_adapter_drafter", "adapter_input_layers"]


def adapter_input_layers(path: str | Path | BaseAdapter) -> list[int]:
    """The EventGPT hidden layers a checkpoint reads: pass them as ``hidden_layers`` to the draft's prefill."""
    if isinstance(path, BaseAdapter):
        meta = getattr(path, "meta", {}) or {}
    else:
        _, meta = read_adapter_meta(path)
    return [int(meta.get("input_layer", -1))]


class HiddenAdapterDrafter(SyncedDrafter):
    """Drafts target tokens from EventGPT hidden states through an adapter and the target's LM head.

    ``draft_state`` must be freshly prefilled with ``hidden_layers`` containing ``input_layer``
    (its last prompt row is the state that precedes the first answer token).
    ``target_lm_head``: the target's LM head module or its (V, H) weight. ``vocab_limit``: ids
    >= it are never proposed (the shared base vocabulary). ``stats`` counts EventGPT forward
    calls (``steps``), ``tokens_fed``, ``seconds`` in :meth:`propose` (device-synchronised when
    ``sync`` is given), proposals, tokens proposed and adapter calls. The cache sync is
    :class:`common.speculative.SyncedDrafter`'s; its rows are the states at ``input_layer``.
    """

    def __init__(self, adapter: BaseAdapter, draft_model: Any, draft_state: Any, target_lm_head: Any, *,
                 input_layer: int = -1, vocab_limit: int | None = None, draft_vocab_limit: int | None = None,
                 stop_token_ids: Iterable[int] = (), name: str | None = None, sync: Any = None,
                 clock: Any = time.perf_counter, chain: str = "auto", chain_capacity: int = 2048):
        self.check_fresh(draft_state, "HiddenAdapterDrafter")
        prompt_hidden = (getattr(draft_state, "hidden", None) or {}).get(input_layer)
        if prompt_hidden is None:
            raise ValueError(f"the draft state holds no hidden layer {input_layer}: prefill it with "
                             f"draft.prefill(visual, question, hidden_layers=[{input_layer}])")
        super().__init__(prompt_hidden.reshape(-1, prompt_hidden.shape[-1])[-1],
                         name=name or f"hidden_adapter_L{adapter.level}", sync=sync, clock=clock, adapter_calls=0)
        self.adapter = adapter.eval()
        self.model, self.state = draft_model, draft_state
        self.lm_head = target_lm_head
        self.input_layer = int(input_layer)
        self.vocab_limit = vocab_limit
        if draft_vocab_limit is None:  # target ids the draft reads as themselves; others become its unk
            known = [int(x) for x in (getattr(draft_model, "base_vocab_size", None), vocab_limit) if x is not None]
            draft_vocab_limit = min(known) if known else 1 << 62
        self.draft_vocab_limit = int(draft_vocab_limit)
        unk = getattr(getattr(draft_model, "tokenizer", None), "unk_token_id", None)
        self.unk = int(unk) if unk is not None else 0
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        p = next(adapter.parameters())
        self._adapter_device, self._adapter_dtype = p.device, p.dtype
        # L5 only: its feature-space chain at fixed shapes over a KV cache (CUDA graphs when the draft model
        # decodes with them); the eager reference recomputes the whole history per token
        graphable = plain_weights(target_lm_head) and getattr(draft_model, "graphs", None) is not None
        mode = pick_chain_mode(chain, p.device.type == "cuda", graphable)
        # (an adapter without the static chain, e.g. a small pair's L5 on its widened twin, drafts eagerly)
        self.chain_mode = mode if adapter.predicts_next and hasattr(adapter, "draft_chain") else "eager"
        self._chain_capacity = int(chain_capacity)
        self._chain: Any = None
        self._trunk_len = 0  # trunk rows in the chain's cache: rows t < it hold (aligned state t, fed token t)
        self._owner = object()

    @property
    def states(self) -> list[torch.Tensor]:
        """The draft's states at the adapter's input layer for rows 0..len(fed_tokens)."""
        return self.rows

    # ----- the draft cache (synced by the base) -----
    def _forward(self, tokens: list[int]) -> list[torch.Tensor]:
        ids = [t if 0 <= t < self.draft_vocab_limit else self.unk for t in tokens]
        self.model.forward(self.state, ids, hidden_layers=[self.input_layer])
        hidden = self.state.hidden[self.input_layer]
        rows = hidden.reshape(-1, hidden.shape[-1])
        return [rows[i] for i in range(rows.shape[0])]

    def _truncate(self, keep: int) -> None:
        self.model.truncate(self.state, self.state.prompt_length + keep)
        self._trunk_len = min(self._trunk_len, keep)

    # ----- mapping -----
    def _map(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Adapter output for the last row (sequence levels see the whole history)."""
        self.stats["adapter_calls"] += 1
        if self.adapter.causal_sequence:
            x = torch.stack(rows).to(self._adapter_device, self._adapter_dtype)
            out, _ = self.adapter(x.unsqueeze(0))
            return out[0, -1]
        out, _ = self.adapter(rows[-1].to(self._adapter_device, self._adapter_dtype).unsqueeze(0))
        return out[0]

    def _token(self, feature: torch.Tensor) -> int:
        return int(masked_logits(feature, self.lm_head, self.vocab_limit).argmax())

    @torch.no_grad()
    def _draft(self, context: list[int], gamma: int) -> DraftProposal:
        """Sync to ``context`` and draft up to ``gamma`` tokens (stopping after a stop token)."""
        tokens: list[int] = []
        self.sync_to(context)
        chain = self._l5_chain(len(context), gamma) if self.adapter.predicts_next else None
        if chain is not None:
            return DraftProposal(self._chain_draft(chain, context, gamma), None)
        if self.adapter.predicts_next:
            x = torch.stack(self._rows).to(self._adapter_device, self._adapter_dtype)
            self.stats["adapter_calls"] += 1
            tokens = self.adapter.speculative_decode(x, context, self.lm_head, gamma, self.vocab_limit,
                                                     self.stop_token_ids)
        else:
            for i in range(gamma):
                token = self._token(self._map(self._rows))
                tokens.append(token)
                if token in self.stop_token_ids or i == gamma - 1:
                    break
                self._feed([token])
        return DraftProposal(tokens, None)


    # ----- the L5 chain at fixed shapes (common.drafters.draft_graphs) -----
    def _l5_chain(self, n: int, gamma: int) -> Any:
        """The adapter's shared static chain holding this drafter's trunk rows, or None (eager L5)."""
        if self.chain_mode == "eager":
            return None
        if self._chain is None:
            self._chain = self.adapter.draft_chain(self.lm_head, self.vocab_limit, self._chain_capacity, gamma + 1,
                                                   graphs=self.chain_mode == "graph")
        chain = self._chain
        if chain.owner is not self._owner:  # another drafter of this adapter used the cache
            chain.claim(self._owner)
            self._trunk_len = 0
        chain.cache.truncate(self._trunk_len)
        size = chain.commit_size
        if not chain.fits(size * -(-(n - self._trunk_len) // size) + gamma):
            self._chain, self.chain_mode = None, "eager"  # the answer outgrew the static cache
            return None
        return chain

    def _chain_draft(self, chain: Any, context: list[int], gamma: int) -> list[int]:
        """Commit the new trunk rows, then draft ``gamma`` tokens from the aligned last state in one chain."""
        n, done = len(context), chain.cache.length
        aligned = self.adapter.align(torch.stack(self._rows[done:]).to(self._adapter_device, self._adapter_dtype))
        self.stats["adapter_calls"] += 1
        if n > done:
            chain.commit(aligned[:n - done], context[done:n])
        self._trunk_len = n
        return cut_after_stop(chain.chain(aligned[-1], gamma), self.stop_token_ids)


def load_hidden_adapter_drafter(path: str | Path | BaseAdapter, draft_model: Any, draft_state: Any,
                                target_model: Any, *, stop_token_ids: Iterable[int] | None = None, sync: Any = None,
                                device: str | torch.device | None = None) -> HiddenAdapterDrafter:
    """A :class:`HiddenAdapterDrafter` from an adapter checkpoint (file or training folder).

    ``path`` may also be an adapter already loaded with ``load_any_adapter`` (load once, build a
    drafter per sample). ``draft_state`` must come from ``draft_model.prefill(visual, question,
    hidden_layers=adapter_input_layers(path))``. The adapter runs on the target's device in
    float32 (``device`` overrides); drafts stop at the target's eos unless ``stop_token_ids``.
    """
    if isinstance(path, BaseAdapter):
        adapter = path
    else:
        adapter = load_any_adapter(path, device or target_model.device)
    meta = getattr(adapter, "meta", {}) or {}
    input_layer = int(meta.get("input_layer", -1))
    limit = min(int(draft_model.base_vocab_size), int(target_model.base_vocab_size))
    if adapter.io_sizes != (draft_model.hidden_size, target_model.hidden_size):
        raise ValueError(f"{path}: adapter maps {adapter.io_sizes[0]} -> {adapter.io_sizes[1]}, but the "
                         f"models have hidden sizes {draft_model.hidden_size} -> {target_model.hidden_size}")
    stops = stop_token_ids if stop_token_ids is not None else [target_model.eos_token_id]
    return HiddenAdapterDrafter(adapter, draft_model, draft_state, target_model.lm_head, input_layer=input_layer,
                                vocab_limit=limit, stop_token_ids=stops, sync=sync)
