"""The hybrid's EAGLE phase (common.hybrid): after the switch it proposes exactly what a plain EagleDrafter proposes
for the same context, eager and static chain alike, and the target wrapper publishes its prefilled state only once
the prefill's device work is done (the draft lane reads it from another stream at once)."""

from __future__ import annotations

import pytest
import torch

from common.drafters.eagle_head import EagleDrafter, EagleHead, EagleHeadConfig, EagleTarget
from common.hybrid import HybridDrafter
from common.speculative import DraftProposal, autoregressive_generate, speculative_generate
from tests.test_draft_graphs import _tiny

QUESTION = "5 9 13"


class Scripted:
    """The first drafter: proposes the scripted tokens after the context (stands in for EventGPT)."""

    name = "scripted"

    def __init__(self, tokens: list[int]):
        self.tokens, self.stats = tokens, {}

    def propose(self, context, gamma):
        return DraftProposal(self.tokens[len(context):len(context) + gamma])


class Recording:
    name = "recording"

    def __init__(self, drafter):
        self.drafter, self.calls = drafter, []

    @property
    def stats(self):
        return self.drafter.stats

    def propose(self, context, gamma):
        proposal = self.drafter.propose(context, gamma)
        self.calls.append((list(context), gamma, list(proposal.tokens)))
        return proposal


def _plain_eagle_proposal(target, visual, head, context: list[int], gamma: int) -> list[int]:
    """A fresh EagleDrafter's proposal after ``context`` once the target has verified all but its last token."""
    proxy = EagleTarget(target, -1)
    state = proxy.prefill(visual, QUESTION)
    if len(context) > 1:
        proxy.forward(state, context[:-1])
    return EagleDrafter(head, proxy, state, stop_token_ids=(), chain="eager").propose(context, gamma).tokens


@pytest.mark.parametrize("chain", ["eager", "static"])
@pytest.mark.parametrize("num_free", [0, 4])
def test_hybrid_second_phase_proposes_the_plain_eagle_drafters_tokens(chain, num_free):
    target, visual = _tiny()
    torch.manual_seed(4)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    greedy = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=24,
                                     stop_token_ids=()).tokens
    script = greedy[:num_free - 1] + [(greedy[num_free - 1] + 1) % 60] if num_free else []  # last free one wrong
    syncs: list[bool] = []
    proxy = EagleTarget(target, -1, sync=lambda: syncs.append(proxy.last_state is None))
    second = EagleDrafter(head, proxy, None, stop_token_ids=(), chain=chain)
    hybrid = HybridDrafter(Scripted(script + [1] * 8), second, proxy)
    free: list[int] = []
    for _ in range(num_free):  # run_parallel's free window, the target still prefilling
        free += hybrid.propose(list(free), 1).tokens
    assert hybrid.switched_at is None and hybrid.phase_tokens == {"first": num_free, "second": 0}
    state = proxy.prefill(visual, QUESTION)
    assert syncs == [True]  # the state was published after the prefill's sync, never before
    free += hybrid.propose(list(free), 1).tokens  # the switch can come inside the window (the draft lane)
    assert hybrid.switched_at == num_free
    rec = Recording(hybrid)
    result = speculative_generate(proxy, state, rec, max_new_tokens=24, gamma=4, stop_token_ids=(),
                                  initial_proposal=DraftProposal(free))
    assert result.tokens == greedy  # lossless
    if num_free:
        assert result.iterations[0][:1] == (num_free + 1,) and result.iterations[0][1] == num_free - 1
    assert len(rec.calls) > 3 and any(tokens for _, _, tokens in rec.calls)
    for context, gamma, tokens in rec.calls:
        assert tokens == _plain_eagle_proposal(target, visual, head, context, gamma), context


def test_the_target_wrapper_publishes_its_state_after_the_prefills_device_work():
    target, visual = _tiny()
    seen: list = []
    proxy = EagleTarget(target, -1, sync=lambda: seen.append(proxy.last_state))
    state = proxy.prefill(visual, QUESTION)
    assert seen == [None] and proxy.last_state is state  # not visible before the sync
    assert proxy.features(state).shape[0] == 1 and torch.isfinite(proxy.features(state)).all()


def test_a_switch_inside_the_free_window_leaves_the_chain_to_the_engines_gamma():
    """The one-token proposal from unverified free tokens runs eagerly; the static chain is attached at the
    engine's first proposal, with commit size gamma + 1 (a plain EAGLE run's), not 2."""
    from common.drafters.eagle_head import CHAIN_CAPACITY

    target, visual = _tiny()
    torch.manual_seed(4)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    proxy = EagleTarget(target, -1)
    second = EagleDrafter(head, proxy, None, stop_token_ids=(), chain="static")
    hybrid = HybridDrafter(Scripted([7, 8, 9, 1, 1]), second, proxy)
    free = hybrid.propose([], 1).tokens + hybrid.propose([7], 1).tokens
    state = proxy.prefill(visual, QUESTION)
    free += hybrid.propose(list(free), 1).tokens  # EAGLE, from two unverified tokens
    assert hybrid.switched_at == 2 and len(free) == 3
    result = speculative_generate(proxy, state, hybrid, max_new_tokens=16, gamma=4, stop_token_ids=(),
                                  initial_proposal=DraftProposal(free))
    greedy = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=16,
                                     stop_token_ids=()).tokens
    assert result.tokens == greedy and second.chain_mode == "static"
    assert head.draft_chain(CHAIN_CAPACITY, 5).owner is not None  # the engine's chain, claimed by the drafter
    assert head.draft_chain(CHAIN_CAPACITY, 2).owner is None  # made just now by this query: nobody drafted on it
