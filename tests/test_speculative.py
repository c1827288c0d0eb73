"""Speculative decoding engine: losslessness, rollback, metrics, sampling distribution, theory."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from common.sampling import probs_from_logits, sample_from_logits
from common.speculative import (
    DraftProposal,
    ModelDrafter,
    SpecResult,
    StaticDrafter,
    aggregate_metrics,
    autoregressive_generate,
    expected_tokens_per_step,
    predicted_speedup,
    speculative_generate,
)
from tests.fakes import FakeLM, RecordingDrafter, copy_of, never_agree, sometimes_agree, special_loving

PROMPTS = [[3, 5, 7], [2, 9], [11, 4, 4, 8], [0], [6, 13, 2], [15, 15]]


def target_lm(**kw) -> FakeLM:
    return FakeLM(**{"vocab_size": 16, "seed": 0, "eos_bias": -2.0, **kw})


def baseline(target: FakeLM, prompt, max_new_tokens: int, **kw) -> list[int]:
    return autoregressive_generate(target, target.prefill(prompt), max_new_tokens=max_new_tokens, **kw).tokens


def drafter_for(draft: FakeLM, prompt, vocab_limit: int, **kw) -> ModelDrafter:
    return ModelDrafter(draft, draft.prefill(prompt), vocab_limit=vocab_limit, **kw)


def check_counts(result: SpecResult, max_new_tokens: int) -> None:
    """Counts add up: tokens = accepted + steps (up to trimming), histogram = steps."""
    its = result.iterations
    assert sum(a for _, a in its) == result.num_accepted
    assert sum(d for d, _ in its) == result.num_drafted
    assert all(0 <= a <= d for d, a in its)
    assert sum(result.accepted_length_histogram.values()) == result.num_verify_steps
    emitted = result.num_accepted + result.num_verify_steps
    if result.stop_reason == "max_new_tokens":
        assert len(result.tokens) == emitted == max_new_tokens
    else:
        assert len(result.tokens) <= emitted
    json.dumps(result.to_dict())


DRAFTS = {
    "copy": lambda t: copy_of(t),
    "never": never_agree,
    "sometimes": sometimes_agree,
}


# ----- temperature 0: token-for-token identical to the target's own greedy output -----

@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("kind", ["copy", "never", "sometimes"])
def test_greedy_matches_autoregressive(gamma, kind):
    target = target_lm()
    for prompt in PROMPTS:
        for max_new in (1, 2, 23):
            expected = baseline(target, prompt, max_new)
            drafter = drafter_for(DRAFTS[kind](target), prompt, vocab_limit=16)
            state = target.prefill(prompt)
            result = speculative_generate(target, state, drafter, max_new_tokens=max_new, gamma=gamma)
            assert result.tokens == expected, (kind, gamma, prompt, max_new)
            check_counts(result, max_new)
            # the drafter's cache really holds what it thinks it fed
            assert drafter.state.generated == drafter.fed_tokens
            if result.stop_reason == "max_new_tokens":  # rollback left exactly the emitted tokens (last pending)
                assert state.generated == result.tokens[:-1]


def test_no_stop_tokens_runs_to_max_and_rollback_is_exact():
    target = target_lm(eos_bias=0.0)
    for prompt in PROMPTS:
        for gamma in (1, 3, 5):
            expected = baseline(target, prompt, 31, stop_token_ids=())
            state = target.prefill(prompt)
            result = speculative_generate(target, state, drafter_for(sometimes_agree(target), prompt, 16),
                                          max_new_tokens=31, gamma=gamma, stop_token_ids=())
            assert result.tokens == expected and len(expected) == 31
            assert state.generated == result.tokens[:-1]
            check_counts(result, 31)


def test_always_agree_metrics():
    target = target_lm()
    gamma, max_new = 3, 23  # 23 is not a multiple of gamma + 1
    state = target.prefill(PROMPTS[0])
    result = speculative_generate(target, state, drafter_for(copy_of(target), PROMPTS[0], 16),
                                  max_new_tokens=max_new, gamma=gamma, stop_token_ids=())
    assert result.acceptance_rate == 1.0
    assert result.iterations == [(3, 3)] * 5 + [(2, 2)]
    assert all(a == gamma for _, a in result.iterations[:-1])
    assert result.mean_accepted_length == pytest.approx(23 / 6)
    assert result.per_position_acceptance == [1.0, 1.0, 1.0]
    assert result.accepted_length_histogram == {2: 1, 3: 5}
    assert result.token_acceptance_probability == 1.0
    # one target forward per step, each feeding the pending token plus the draft
    assert target.forward_sizes[-6:] == [3, 4, 4, 4, 4, 3]
    assert result.target_forwards == 6
    check_counts(result, max_new)


def test_never_agree_metrics():
    target = target_lm()
    result = speculative_generate(target, target.prefill(PROMPTS[1]), drafter_for(never_agree(target), PROMPTS[1], 16),
                                  max_new_tokens=20, gamma=4, stop_token_ids=())
    assert result.tokens == baseline(target, PROMPTS[1], 20, stop_token_ids=())
    assert result.acceptance_rate == 0.0
    assert result.mean_accepted_length == 1.0
    assert result.token_acceptance_probability == 0.0
    assert set(result.accepted_length_histogram) == {0}
    assert result.num_verify_steps == 20
    assert result.per_position_acceptance[0] == 0.0
    check_counts(result, 20)


def test_sometimes_agree_is_in_between():
    target = target_lm()
    results = []
    for prompt in PROMPTS:
        results.append(speculative_generate(target, target.prefill(prompt),
                                            drafter_for(sometimes_agree(target), prompt, 16),
                                            max_new_tokens=40, gamma=3, stop_token_ids=()))
    agg = aggregate_metrics(results)
    assert 0.15 < agg["acceptance_rate"] < 0.85
    assert 1.0 < agg["mean_accepted_length"] < 4.0
    # pooled counts are sums over samples
    assert agg["num_accepted"] == sum(r.num_accepted for r in results)
    assert agg["num_drafted"] == sum(r.num_drafted for r in results)
    assert agg["num_verify_steps"] == sum(r.num_verify_steps for r in results)
    assert agg["num_tokens"] == agg["num_accepted"] + agg["num_verify_steps"]
    assert sum(agg["accepted_length_histogram"].values()) == agg["num_verify_steps"]
    assert agg["target_forwards"] == sum(r.target_forwards for r in results)
    assert agg["draft_steps"] == sum(r.draft_steps for r in results)
    first = agg["per_position_counts"][0]
    assert first[1] == sum(1 for r in results for d, _ in r.iterations if d >= 1)
    # per-position acceptance can only fall with depth
    ppa = agg["per_position_acceptance"]
    assert all(x >= y for x, y in zip(ppa, ppa[1:]))
    json.dumps(agg)


@pytest.mark.parametrize("length", [1, 3, 8, 40])
@pytest.mark.parametrize("kind", ["copy", "never", "sometimes"])
def test_initial_proposal(length, kind):
    """Free tokens drafted during the target's prefill: verified in one forward, output unchanged."""
    target = target_lm()
    for prompt in PROMPTS[:4]:
        expected = baseline(target, prompt, 25)
        drafter = drafter_for(DRAFTS[kind](target), prompt, vocab_limit=16)
        initial = drafter.propose([], length)
        state = target.prefill(prompt)
        result = speculative_generate(target, state, drafter, max_new_tokens=25, gamma=3, initial_proposal=initial)
        assert result.tokens == expected
        assert result.iterations[0][0] == min(length, 24)
        if kind == "copy" and result.stop_reason == "max_new_tokens":
            assert result.iterations[0][1] == min(length, 24)
        check_counts(result, 25)


def test_initial_proposal_longer_than_budget_is_trimmed():
    target = target_lm()
    drafter = drafter_for(copy_of(target), PROMPTS[0], 16)
    initial = drafter.propose([], 10)
    result = speculative_generate(target, target.prefill(PROMPTS[0]), drafter, max_new_tokens=4, gamma=2,
                                  initial_proposal=initial, stop_token_ids=())
    assert result.tokens == baseline(target, PROMPTS[0], 4, stop_token_ids=())
    assert result.iterations == [(3, 3)]


def test_eos_inside_an_accepted_run():
    target = FakeLM(vocab_size=16, seed=0, eos_bias=0.0)
    found = 0
    for seed in range(40):
        prompt = [seed % 16, (seed * 7) % 16]
        expected = baseline(target, prompt, 30)
        if expected[-1] != target.eos_token_id or len(expected) < 3:
            continue
        result = speculative_generate(target, target.prefill(prompt), drafter_for(copy_of(target), prompt, 16),
                                      max_new_tokens=30, gamma=5)
        assert result.tokens == expected
        assert result.stop_reason == "stop_token" and result.tokens.count(target.eos_token_id) == 1
        # eos arrived as an accepted draft token, with the accepted tokens after it discarded
        found += result.num_accepted + result.num_verify_steps > len(result.tokens)
    assert found >= 3


def test_custom_stop_tokens():
    target = target_lm()
    full = baseline(target, PROMPTS[2], 30, stop_token_ids=())
    stop = full[6]
    expected = full[:full.index(stop) + 1]
    result = speculative_generate(target, target.prefill(PROMPTS[2]), drafter_for(copy_of(target), PROMPTS[2], 16),
                                  max_new_tokens=30, gamma=4, stop_token_ids=[stop])
    assert result.tokens == expected == baseline(target, PROMPTS[2], 30, stop_token_ids=[stop])


def test_empty_and_static_drafts_degenerate_to_plain_decoding():
    target = target_lm()
    expected = baseline(target, PROMPTS[0], 15)
    for drafter in (StaticDrafter([]), StaticDrafter([0] * 40), StaticDrafter(expected)):
        result = speculative_generate(target, target.prefill(PROMPTS[0]), drafter, max_new_tokens=15, gamma=3)
        assert result.tokens == expected
        check_counts(result, 15)
    perfect = speculative_generate(target, target.prefill(PROMPTS[0]), StaticDrafter(expected),
                                   max_new_tokens=15, gamma=3)
    assert perfect.acceptance_rate == 1.0
    empty = speculative_generate(target, target.prefill(PROMPTS[0]), StaticDrafter([]), max_new_tokens=15, gamma=3)
    assert empty.acceptance_rate is None and empty.mean_accepted_length == 1.0
    assert empty.target_forwards == len(expected) - 1  # first token straight from the prefill logits


def test_gamma_zero_and_zero_tokens():
    target = target_lm()
    expected = baseline(target, PROMPTS[1], 10)
    assert speculative_generate(target, target.prefill(PROMPTS[1]), StaticDrafter(expected),
                                max_new_tokens=10, gamma=0).tokens == expected
    assert speculative_generate(target, target.prefill(PROMPTS[1]), StaticDrafter(expected),
                                max_new_tokens=0, gamma=3).tokens == []


def test_draft_ids_beyond_base_vocab_are_never_proposed():
    target = FakeLM(vocab_size=20, base_vocab_size=16, seed=3, eos_bias=-2.0)
    for map_logits in (None, lambda logits: logits):  # default copy-map, and an identity map that leaks them
        for prompt in PROMPTS:
            inner = drafter_for(special_loving(target), prompt, vocab_limit=16, target_vocab_size=20,
                                map_logits=map_logits)
            drafter = RecordingDrafter(inner)
            result = speculative_generate(target, target.prefill(prompt), drafter, max_new_tokens=20, gamma=3)
            assert result.tokens == baseline(target, prompt, 20)
            proposed = [t for p in drafter.proposals for t in p]
            assert proposed and max(proposed) < 16


def test_drafter_resync_after_rollback_and_stale_logits():
    target = target_lm()
    draft = copy_of(target)
    fresh = lambda: drafter_for(copy_of(target), PROMPTS[0], 16)  # noqa: E731
    drafter = drafter_for(draft, PROMPTS[0], 16)
    first = drafter.propose([], 4).tokens
    assert drafter.fed_tokens == first[:3]
    assert drafter.propose([], 2).tokens == first[:2]  # back to the saved prefill logits
    assert drafter.propose([first[0]], 2).tokens == fresh().propose([first[0]], 2).tokens
    # context a strict prefix of what was fed: logits are stale, truncate one more and re-feed
    drafter.propose(first[:3], 1)
    assert drafter.fed_tokens == first[:3]
    assert drafter.propose(first[:2], 2).tokens == fresh().propose(first[:2], 2).tokens
    # a diverging context rolls back to the common prefix
    other = [first[0], (first[1] + 1) % 16, 5]
    assert drafter.propose(other, 3).tokens == fresh().propose(other, 3).tokens
    assert draft.prefill(PROMPTS[0]).prompt_length + len(drafter.fed_tokens) == drafter.state.length
    assert drafter.state.generated == drafter.fed_tokens
    assert drafter.stats["steps"] > 0 and drafter.stats["tokens_fed"] >= drafter.stats["steps"]


def test_timing_and_sync_are_used():
    target = target_lm()
    ticks = iter(range(10_000))
    syncs = []
    result = speculative_generate(target, target.prefill(PROMPTS[0]), drafter_for(copy_of(target), PROMPTS[0], 16),
                                  max_new_tokens=12, gamma=3, stop_token_ids=(), sync=lambda: syncs.append(1),
                                  clock=lambda: float(next(ticks)))
    assert result.draft_seconds > 0 and result.verify_seconds > 0
    assert result.total_seconds >= result.draft_seconds + result.verify_seconds
    assert len(syncs) > 0
    assert result.draft_steps == 2 + 3 + 3  # gamma - 1 decode feeds per proposal, plus a sync feed after the first


def test_model_drafter_needs_fresh_state():
    target = target_lm()
    state = target.prefill(PROMPTS[0])
    target.forward(state, [1])
    with pytest.raises(ValueError):
        ModelDrafter(target, state, vocab_limit=16)
    with pytest.raises(ValueError):
        speculative_generate(target, state, StaticDrafter([]), max_new_tokens=3, gamma=2)


# ----- temperature > 0: the output distribution is exactly the target's -----



def chi_square(counts: dict, expected_probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic with cells of expected count < 5 pooled; returns (statistic, degrees of freedom)."""
    stat, df, pool_obs, pool_exp = 0.0, -1, 0.0, 0.0
    for key, p in expected_probs.items():
        e, o = n * p, counts.get(key, 0)
        if e < 5:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        df += 1
    return stat, df


def chi_square_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square(df) by the Wilson-Hilferty approximation."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_target_two_token_law(outs: list[tuple], target: FakeLM, prompt: list[int], temperature: float) -> None:
    """The two-token outputs ``outs`` pass a chi-square test (0.1%) against the target's own joint distribution."""
    p1 = probs_from_logits(target.context_logits(prompt), temperature)
    joint = {}
    for a in range(len(p1)):
        p2 = probs_from_logits(target.context_logits(prompt + [a]), temperature)
        for b in range(len(p2)):
            joint[(a, b)] = float(p1[a] * p2[b])
    stat, df = chi_square(Counter(outs), joint, len(outs))
    assert stat < chi_square_critical(df), (stat, df)


def run_many(target: FakeLM, draft: FakeLM | None, prompt, n: int, max_new: int, gamma: int, temperature=1.0,
             seed: int = 1234, static=None):
    gen = torch.Generator().manual_seed(seed)
    outs, results = [], []
    for _ in range(n):
        if static is not None:
            drafter = StaticDrafter(static)
        else:
            drafter = ModelDrafter(draft, draft.prefill(prompt), vocab_limit=target.vocab_size,
                                   temperature=temperature, generator=gen)
        r = speculative_generate(target, target.prefill(prompt), drafter, max_new_tokens=max_new, gamma=gamma,
                                 temperature=temperature, generator=gen, stop_token_ids=())
        outs.append(tuple(r.tokens))
        results.append(r)
    return outs, results


def small_pair():
    target = FakeLM(vocab_size=6, seed=11, scale=1.0, eos_token_id=None)
    draft = FakeLM(vocab_size=6, seed=12, scale=1.0, eos_token_id=None)
    return target, draft


def test_sampling_matches_target_distribution_two_tokens():
    target, draft = small_pair()
    prompt, temperature, n = [1, 2], 0.8, 3000
    p1 = probs_from_logits(target.context_logits(prompt), temperature)
    q1 = probs_from_logits(draft.context_logits(prompt), temperature)
    assert float((p1 - q1).abs().sum()) / 2 > 0.15  # the draft really differs from the target
    outs, results = run_many(target, draft, prompt, n, max_new=2, gamma=2, temperature=temperature)
    assert all(len(o) == 2 for o in outs)
    agg = aggregate_metrics(results)
    assert 0.1 < agg["acceptance_rate"] < 0.95  # both accept and reject paths exercised
    assert_target_two_token_law(outs, target, prompt, temperature)
    first = Counter(o[0] for o in outs)
    stat1, df1 = chi_square(first, {a: float(p1[a]) for a in range(6)}, n)
    assert stat1 < chi_square_critical(df1)
    # the test has power: samples of the draft's own q fail it
    gen = torch.Generator().manual_seed(5)
    naive = Counter(sample_from_logits(draft.context_logits(prompt), temperature, gen) for _ in range(n))
    stat_q, df_q = chi_square(naive, {a: float(p1[a]) for a in range(6)}, n)
    assert stat_q > chi_square_critical(df_q)


def test_sampling_with_greedy_static_draft_matches_target():
    """A deterministic draft (q one-hot) is also corrected to the target's distribution."""
    target, _ = small_pair()
    prompt, n = [4], 3000
    p1 = probs_from_logits(target.context_logits(prompt), 1.0)
    outs, _ = run_many(target, None, prompt, n, max_new=2, gamma=1, static=[int(p1.argmin())])
    stat, df = chi_square(Counter(o[0] for o in outs), {a: float(p1[a]) for a in range(6)}, n)
    assert stat < chi_square_critical(df)


def test_sampling_reproducible_and_copy_draft_always_accepted():
    target, _ = small_pair()
    a, _ = run_many(target, copy_of(target), [3], 20, max_new=8, gamma=3, seed=7)
    b, results = run_many(target, copy_of(target), [3], 20, max_new=8, gamma=3, seed=7)
    assert a == b
    assert aggregate_metrics(results)["acceptance_rate"] == 1.0


def test_sampling_without_drafts_equals_plain_sampling():
    """Same seed, no drafts: the engine consumes randomness exactly like the baseline."""
    target, _ = small_pair()
    spec = speculative_generate(target, target.prefill([2]), StaticDrafter([]), max_new_tokens=12, gamma=3,
                                temperature=0.7, generator=torch.Generator().manual_seed(3))
    plain = autoregressive_generate(target, target.prefill([2]), max_new_tokens=12, temperature=0.7,
                                    generator=torch.Generator().manual_seed(3))
    assert spec.tokens == plain.tokens and len(plain.tokens) == 12


# ----- theory and summaries -----

def test_leviathan_formulas():
    assert expected_tokens_per_step(0.0, 5) == 1.0
    assert expected_tokens_per_step(1.0, 5) == 6.0
    assert expected_tokens_per_step(0.999999, 5) == pytest.approx(6.0, rel=1e-4)
    assert expected_tokens_per_step(0.5, 3) == pytest.approx(1.875)
    assert predicted_speedup(0.5, 3, 0.1) == pytest.approx(1.875 / 1.3)
    assert predicted_speedup(0.0, 4, 0.25) == pytest.approx(0.5)
    assert predicted_speedup(1.0, 4, 0.0) == 5.0
    with pytest.raises(ValueError):
        expected_tokens_per_step(1.5, 3)


def test_result_dict():
    result = SpecResult(tokens=[1, 2, 3, 4, 5], iterations=[(3, 3), (3, 0)], total_seconds=2.0)
    assert result.acceptance_rate == 0.5
    assert result.token_acceptance_probability == pytest.approx(3 / 4)
    assert result.mean_accepted_length == 2.5
    assert result.per_position_acceptance == [0.5, 0.5, 0.5]
    d = result.to_dict()
    assert d["accepted_length_histogram"] == {"0": 1, "3": 1}
    assert json.loads(json.dumps(d))["iterations"] == [[3, 3], [3, 0]]


def test_draft_proposal_limited():
    p = DraftProposal([1, 2, 3], torch.ones(3, 5) / 5)
    assert p.limited(2).tokens == [1, 2] and p.limited(2).probs.shape == (2, 5)
    assert p.limited(5) is p and p.limited(0).tokens == []


# ----- the real decoder runner and KV cache behind the uniform interface -----

class TinyTextVLM:
    """Builds a tiny random LLaMA behind ``VisionLanguageModel`` (text-only prompts), for a real-cache check."""

    @staticmethod
    def make(seed: int, vocab: int = 64, base_vocab: int = 60, hidden: int = 32, device: str = "cpu",
             dtype: torch.dtype = torch.float32):
        from types import SimpleNamespace

        from transformers import LlamaConfig, LlamaModel

        from common.vlm import VisionLanguageModel, VisualInput

        class TextVLM(VisionLanguageModel):
            def build_prompt(self, question):
                return question

            def load_visual(self, sample):
                return sample

            def preprocess(self, raw):
                return raw

            def encode_pixels_eager(self, pixels):
                return VisualInput(embeds=pixels)

            def prompt_embeds(self, visual, question):
                ids = torch.tensor([int(t) for t in question.split()], device=self.device)
                return torch.cat([visual.embeds, self.embed_tokens(ids)])

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        lm = LlamaModel(config).eval()
        head = torch.nn.Linear(hidden, vocab, bias=False)
        torch.nn.init.normal_(head.weight, std=2.0)
        lm.to(device, dtype), head.to(device, dtype)
        model = TextVLM(lm, lm, head, SimpleNamespace(eos_token_id=2), base_vocab_size=base_vocab)
        model.decode_room = 4  # force the cache to grow during generation
        return model


def test_real_kv_cache_greedy_lossless():
    target, other = TinyTextVLM.make(0), TinyTextVLM.make(1)
    from common.vlm import VisualInput
    visual = VisualInput(embeds=torch.zeros(3, 32))
    for question in ("5 9 13", "7 7 21 40"):
        expected = autoregressive_generate(target, target.prefill(visual, question), max_new_tokens=30,
                                           stop_token_ids=()).tokens
        for draft in (target, other):
            for gamma in (2, 5):
                drafter = ModelDrafter(draft, draft.prefill(visual, question), vocab_limit=60,
                                       target_vocab_size=target.vocab_size)
                state = target.prefill(visual, question)
                result = speculative_generate(target, state, drafter, max_new_tokens=30, gamma=gamma,
                                              stop_token_ids=())
                assert result.tokens == expected
                assert state.length == state.prompt_length + 29  # rejected positions were dropped
                check_counts(result, 30)
                if draft is target and max(expected) < 60:
                    assert result.acceptance_rate == 1.0
