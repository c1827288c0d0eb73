"""Draft trees (common.tree): mask and position values, KV compaction, lossless greedy and sampled verification."""

from __future__ import annotations

import pytest
import torch

from common.models.decoder import DecoderShape, KVCache
from common.results import read_jsonl
from common.speculative import ModelDrafter, autoregressive_generate, speculative_generate
from common.tree import (
    DraftTree,
    TreeConfig,
    add_tree_args,
    build_tree,
    compact_cache,
    tree_attention_mask,
    tree_config_from,
    tree_positions,
    tree_summary,
)
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)
from tests.fakes import FakeLM, FakeTreeDrafter, copy_of, never_agree, sometimes_agree
from tests.test_speculative import PROMPTS, assert_target_two_token_law, small_pair, target_lm

DRAFTS = {"copy": lambda t: copy_of(t), "never": never_agree, "sometimes": sometimes_agree,
          "random": lambda t: FakeLM(vocab_size=16, seed=5, eos_bias=-2.0)}


# ----- structure: mask, positions, building, compaction -----

def test_mask_and_positions_values():
    # root children: a(0), b(1); a's children: c(2), d(3); c's child: e(4)
    parents = [-1, -1, 0, 0, 2]
    mask = tree_attention_mask(parents, prefix=3, pending=1)
    expected = torch.tensor([
        # prefix  pend  a  b  c  d  e
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # pending
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # a
        [1, 1, 1, 1, 0, 1, 0, 0, 0],  # b
        [1, 1, 1, 1, 1, 0, 1, 0, 0],  # c
        [1, 1, 1, 1, 1, 0, 0, 1, 0],  # d
        [1, 1, 1, 1, 1, 0, 1, 0, 1],  # e
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert tree_positions(parents, prefix=3, pending=1).tolist() == [3, 4, 4, 5, 5, 6]
    # right after prefill (no pending token): nodes of depth d sit at prefix + d - 1
    assert tree_positions(parents, prefix=3, pending=0).tolist() == [3, 3, 4, 4, 5]
    assert torch.equal(tree_attention_mask(parents, 3, 0), expected[1:, [0, 1, 2, 4, 5, 6, 7, 8]])
    # a chain gives the plain causal mask
    chain = tree_attention_mask([-1, 0, 1], prefix=2, pending=1)
    assert torch.equal(chain, torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2))


def test_build_tree_keeps_the_most_likely_ancestor_closed_nodes():
    # log-probs: root prefers 0 (0.6) then 1 (0.3); after any token, 2 (0.7) then 3 (0.2)
    root = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    child = torch.log(torch.tensor([0.05, 0.05, 0.7, 0.2]))
    calls = []

    def expand(tree, frontier):
        calls.append(list(frontier))
        return child.expand(len(frontier), -1)

    tree = build_tree(root, expand, TreeConfig(topk=2, tokens=5))
    assert len(tree) == 4
    # scores: 0:.6, 1:.3, 0-2:.42, 0-3:.12, 1-2:.21, 0-2-2:.294 -> best four: 0, 0-2, 1, 0-2-2
    assert [tree.path_tokens(i) for i in range(len(tree))] == [[0], [1], [0, 2], [0, 2, 2]]
    assert tree.parents == [-1, -1, 0, 2]
    assert tree.depth == 3
    for i, p in enumerate(tree.parents):  # parents first, scores never increase along a path
        assert p < i and (p < 0 or tree.scores[p] >= tree.scores[i])
    # topk 1 is a chain of tokens - 1 argmax steps
    chain = build_tree(root, expand, TreeConfig(topk=1, tokens=4))
    assert chain.tokens == [0, 2, 2] and chain.parents == [-1, 0, 1]
    # max_depth limits, stop tokens are not expanded
    assert build_tree(root, expand, TreeConfig(topk=2, tokens=5), max_depth=1).depth == 1
    stopped = build_tree(root, expand, TreeConfig(topk=1, tokens=4), stop_tokens=frozenset({0}))
    assert stopped.tokens == [0]


def test_compact_cache_moves_the_path_and_truncates():
    shape = DecoderShape(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, hidden_size=8)
    cache = KVCache(shape, 12, torch.float32, torch.device("cpu"))
    cache.keys.copy_(torch.arange(12.0).view(1, 1, 1, 12, 1).expand_as(cache.keys))
    cache.values.copy_(-cache.keys)
    cache.length = 10
    compact_cache(cache.keys, cache.values, start=4, keep=[0, 2, 5])
    cache.truncate(7)
    assert cache.keys[1, 0, 1, :7, 3].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.values[0, 0, 0, :7, 0].tolist() == [0, -1, -2, -3, -4, -6, -9]


def test_tree_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_tree_args(parser)
    args = parser.parse_args(["--tree_topk", "3", "--tree_tokens", "6"])
    assert tree_config_from(args.tree_topk, args.tree_tokens) == TreeConfig(topk=3, tokens=6)
    assert tree_config_from(None, None) is None
    with pytest.raises(ValueError, match="go together"):
        tree_config_from(3, None)
    with pytest.raises(ValueError, match="tree_tokens"):
        TreeConfig(topk=2, tokens=1)
    capped = parser.parse_args(["--tree_topk", "3", "--tree_tokens", "6", "--tree_depth", "2"])
    config = tree_config_from(capped.tree_topk, capped.tree_tokens, capped.tree_depth)
    assert config == TreeConfig(topk=3, tokens=6, depth=2) and config.max_depth == 2
    assert tree_summary(config) == {"topk": 3, "tokens": 6, "depth": 2}
    assert tree_summary(TreeConfig(topk=3, tokens=6)) == {"topk": 3, "tokens": 6}
    with pytest.raises(ValueError, match="--tree_depth caps a draft tree"):
        tree_config_from(None, None, 2)
    with pytest.raises(ValueError, match="--tree_depth must be >= 1"):
        tree_config_from(3, 6, 0)


def test_a_depth_cap_keeps_every_tree_shallow_and_the_output_lossless():
    target = target_lm()
    draft = DRAFTS["copy"](target)
    for prompt in PROMPTS:
        expected = autoregressive_generate(target, target.prefill(prompt), max_new_tokens=20).tokens
        deep, _ = tree_run(target, draft, prompt, TreeConfig(topk=1, tokens=8), 20)
        capped, drafter = tree_run(target, draft, prompt, TreeConfig(topk=2, tokens=8, depth=2), 20)
        assert capped.tokens == deep.tokens == expected
        assert all(t.depth <= 2 for t in drafter.trees) and max(d for d, _ in capped.iterations) == 2
        assert max(d for d, _ in deep.iterations) > 2  # the uncapped chain of 7 does grow deeper


# ----- greedy: identical to the target's own output -----

def tree_run(target, draft, prompt, config, max_new, **kw):
    drafter = FakeTreeDrafter(draft, prompt, stop_token_ids=[target.eos_token_id])
    result = speculative_generate(target, target.prefill(prompt), drafter, max_new_tokens=max_new, gamma=0,
                                  tree=config, **kw)
    return result, drafter


@pytest.mark.parametrize("kind", sorted(DRAFTS))
@pytest.mark.parametrize("topk,tokens", [(1, 4), (2, 6), (3, 8)])
def test_greedy_tree_matches_autoregressive(kind, topk, tokens):
    target = target_lm()
    draft = DRAFTS[kind](target)
    for prompt in PROMPTS:
        expected = autoregressive_generate(target, target.prefill(prompt), max_new_tokens=20).tokens
        result, drafter = tree_run(target, draft, prompt, TreeConfig(topk=topk, tokens=tokens), 20)
        assert result.tokens == expected
        assert all(len(t) <= tokens - 1 for t in drafter.trees)
        assert set(target.forward_sizes[-result.target_forwards:]) <= set(range(1, tokens + 1))
        if kind == "copy":
            # the root's best child scores highest of all nodes, so it is always kept and accepted
            assert all(a >= 1 for d, a in result.iterations if d >= 1)
            if topk == 1:
                assert all(a == d for d, a in result.iterations)
        if kind == "never" and topk == 1:
            assert result.num_accepted == 0


def test_tree_with_topk_one_equals_the_chain():
    target = target_lm()
    draft = sometimes_agree(target, p=0.7)
    for prompt in PROMPTS:
        chain = speculative_generate(target, target.prefill(prompt),
                                     ModelDrafter(draft, draft.prefill(prompt), vocab_limit=16),
                                     max_new_tokens=25, gamma=4)
        tree, drafter = tree_run(target, draft, prompt, TreeConfig(topk=1, tokens=5), 25)
        assert tree.tokens == chain.tokens
        assert tree.iterations[1:] == chain.iterations[1:]
        assert tree.mean_accepted_length == pytest.approx(chain.mean_accepted_length, abs=0.5)


def test_wider_tree_accepts_more_at_equal_verify_cost():
    target = target_lm()
    draft = FakeLM(vocab_size=16, seed=0, scale=3.0, eos_bias=-2.0,
                   transform=lambda tokens, logits: logits + torch.randn(16, generator=torch.Generator().manual_seed(
                       sum(tokens) * 31 + len(tokens))) * 2.0)
    chain_len, tree_len = [], []
    for prompt in PROMPTS:
        chain_len.append(tree_run(target, draft, prompt, TreeConfig(topk=1, tokens=6), 30)[0].mean_accepted_length)
        tree_len.append(tree_run(target, draft, prompt, TreeConfig(topk=4, tokens=6), 30)[0].mean_accepted_length)
    assert sum(tree_len) > sum(chain_len)


# ----- sampled: exactly the target's distribution -----

@pytest.mark.parametrize("sample", [False, True], ids=["topk_children", "sampled_children"])
def test_sampled_tree_matches_target_distribution(sample):
    target, draft = small_pair()
    prompt, temperature, n = [1, 2], 0.8, 3000
    gen = torch.Generator().manual_seed(99)
    outs, accepted = [], 0
    for _ in range(n):
        drafter = FakeTreeDrafter(draft, prompt, sample=sample, temperature=temperature, generator=gen)
        r = speculative_generate(target, target.prefill(prompt), drafter, max_new_tokens=2, gamma=0,
                                 temperature=temperature, generator=gen, stop_token_ids=(),
                                 tree=TreeConfig(topk=2, tokens=4))
        outs.append(tuple(r.tokens))
        accepted += r.num_accepted
    assert 0.2 * n < accepted < 0.98 * n  # accept and reject paths both exercised
    assert_target_two_token_law(outs, target, prompt, temperature)


def test_sampled_tree_copy_draft_accepts_and_is_reproducible():
    target, _ = small_pair()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        drafter = FakeTreeDrafter(copy_of(target), [3], sample=True, temperature=1.0, generator=gen)
        return speculative_generate(target, target.prefill([3]), drafter, max_new_tokens=10, gamma=0,
                                    temperature=1.0, generator=gen, stop_token_ids=(),
                                    tree=TreeConfig(topk=2, tokens=4))

    a, b = run(7), run(7)
    assert a.tokens == b.tokens and len(a.tokens) == 10
    assert a.num_accepted == sum(d for d, _ in a.iterations)  # q == p: the first child is always accepted


def test_chain_drafter_refuses_trees():
    target = target_lm()
    drafter = ModelDrafter(copy_of(target), copy_of(target).prefill([3]), vocab_limit=16, name="eventgpt")
    with pytest.raises(ValueError, match="eventgpt.*chains only"):
        speculative_generate(target, target.prefill([3]), drafter, max_new_tokens=5, gamma=2,
                             tree=TreeConfig(topk=2, tokens=4))


def test_empty_tree_is_plain_decoding():
    target = target_lm()
    tree = DraftTree()
    assert tree.depth == 0 and tree.children(-1) == []
    result, _ = tree_run(target, target, [3, 5], TreeConfig(topk=2, tokens=4), 1)
    assert result.tokens == autoregressive_generate(target, target.prefill([3, 5]), max_new_tokens=1).tokens
    assert result.target_forwards == 0


# ----- real decoders: the runner's explicit mask, KV compaction, the EAGLE head's tree -----

def _eagle(target, seed: int):
    from feature_alignment.eagle_head import EagleDrafter, EagleHead, EagleHeadConfig, EagleTarget

    torch.manual_seed(seed)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target)
    proxy = EagleTarget(target, -1)
    return head, proxy, EagleDrafter


def test_runner_tree_mask_rows_equal_separate_chains():
    """Each node's logits from one masked forward equal the logits of feeding its path alone."""
    from common.vlm import VisualInput
    from tests.test_speculative import TinyTextVLM

    target = TinyTextVLM.make(0)
    visual = VisualInput(embeds=torch.zeros(3, 32))
    parents, tokens = [-1, -1, 0, 0, 2], [5, 9, 13, 7, 21]
    state = target.prefill(visual, "4 8")
    base = state.length
    tree = DraftTree(tokens=tokens, parents=parents)
    logits = target.forward(state, [11] + tokens, attn_mask=tree_attention_mask(parents, base, 1),
                            position_ids=tree_positions(parents, base, 1))
    for i in range(len(tokens)):
        ref_state = target.prefill(visual, "4 8")
        ref = target.forward(ref_state, [11] + tree.path_tokens(i))[-1]
        assert torch.allclose(logits[1 + i], ref, atol=1e-5), i
    # compacting onto path 0 -> 2 -> 4 leaves the cache of feeding [11, 5, 13, 21]
    target.compact(state, base, [0, 1, 3, 5])
    assert state.length == base + 4
    ref_state = target.prefill(visual, "4 8")
    target.forward(ref_state, [11, 5, 13, 21])
    n = state.length
    assert torch.allclose(state.cache.keys[:, :, :, :n], ref_state.cache.keys[:, :, :, :n], atol=1e-5)
    assert torch.allclose(target.forward(state, [3]), target.forward(ref_state, [3]), atol=1e-5)


@pytest.mark.parametrize("topk,tokens", [(1, 5), (4, 8), (8, 12)])
def test_eagle_tree_greedy_lossless_on_a_real_decoder(topk, tokens):
    from common.vlm import VisualInput
    from tests.test_speculative import TinyTextVLM

    target = TinyTextVLM.make(0)
    visual = VisualInput(embeds=torch.zeros(3, 32))
    accepted = 0
    for question in ("5 9 13", "7 7 21 40", "1 2"):
        expected = autoregressive_generate(target, target.prefill(visual, question), max_new_tokens=30,
                                           stop_token_ids=()).tokens
        head, proxy, Drafter = _eagle(target, seed=len(question))
        state = proxy.prefill(visual, question)
        drafter = Drafter(head, proxy, state, stop_token_ids=())
        result = speculative_generate(proxy, state, drafter, max_new_tokens=30, gamma=0, stop_token_ids=(),
                                      tree=TreeConfig(topk=topk, tokens=tokens))
        assert result.tokens == expected
        assert state.length == state.prompt_length + 29
        accepted += result.num_accepted
        # the recorded features followed the compaction: they are the target's own states of the answer
        tf = target.teacher_forced([visual], [question], [result.tokens], hidden_layers=[-1], logits=False)
        feats = proxy.features(state)
        assert torch.allclose(feats[:29], tf.hidden[-1][0][:29], atol=1e-4)
        if topk == 1:  # the same head drafting chains of tokens - 1
            _, proxy2, _ = _eagle(target, seed=0)
            state2 = proxy2.prefill(visual, question)
            chain = speculative_generate(proxy2, state2, Drafter(head, proxy2, state2, stop_token_ids=()),
                                         max_new_tokens=30, gamma=tokens - 1, stop_token_ids=())
            assert chain.tokens == result.tokens and chain.iterations == result.iterations
    if topk > 1:
        assert accepted > 0  # acceptance paths (and compaction of non-trivial paths) were exercised


def test_eagle_tree_on_the_shipped_pair_is_lossless():
    from common.data import ClipDataset
    from common.defaults import default_dataset_dir, default_model_path
    from common.models.loader import load_vlm
    from common.pipeline import prefill_sample

    target = load_vlm("videollava", default_model_path("videollava"), device="cpu")
    sample = list(ClipDataset(default_dataset_dir()))[0]
    reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=12).tokens
    head, proxy, Drafter = _eagle(target, seed=3)
    state = prefill_sample(proxy, sample).state
    result = speculative_generate(proxy, state, Drafter(head, proxy, state), max_new_tokens=12, gamma=0,
                                  tree=TreeConfig(topk=4, tokens=6))
    assert result.tokens == reference


# ----- the flags on the three benchmark scripts -----

def test_tree_flags_in_the_benchmarks(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    from feature_alignment.eagle_head import EagleHead, EagleHeadConfig, save_eagle_head

    from benchmark_inference import benchmark_inference as bi
    from benchmark_parallel_prefill import benchmark_parallel_prefill as bp
    from benchmark_parallel_prefill import compare_drafters as cd
    from common.models.loader import load_vlm

    target = load_vlm("videollava", tiny_models_dir / "videollava", device="cpu")
    save_eagle_head(EagleHead(EagleHeadConfig.for_target(target)), tmp_path / "eagle")
    base = ["--dataset_dir", str(tiny_dataset), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
            "--videollava_path", str(tiny_models_dir / "videollava"), "--task_name", "t", "--max_new_tokens", "8",
            "--gamma", "3", "--warmup_steps", "0", "--max_samples", "1", "--device", "cpu"]
    tree = ["--tree_topk", "3", "--tree_tokens", "4"]
    eagle = ["--drafter", "eagle", "--eagle_head", str(tmp_path / "eagle")]
    seq = bi.main(base + eagle + tree + ["--tree_depth", "2", "--output_dir", str(tmp_path / "seq")])["statistics"]
    assert seq["sd_lossless_rate"] == 1.0 and seq["tree"] == {"topk": 3, "tokens": 4, "depth": 2}
    par = bp.main(base + eagle + tree + ["--output_dir", str(tmp_path / "par")])["statistics"]
    assert par["lossless_rate"] == 1.0
    with pytest.raises(SystemExit, match="'eventgpt' drafts chains only"):
        bi.main(base + tree + ["--output_dir", str(tmp_path / "no")])
    with pytest.raises(SystemExit, match="go together"):
        bp.main(base + eagle + ["--tree_topk", "3", "--output_dir", str(tmp_path / "no")])
    cmp = cd.main(base + ["--drafters", "eagle,hybrid", "--eagle_head", str(tmp_path / "eagle"),
                          "--max_free_tokens", "2", "--output_dir", str(tmp_path / "cmp")] + tree)["statistics"]
    assert set(cmp["drafters"]) == {"eagle", "hybrid", "eagle_tree", "hybrid_tree"}
    assert all(s["lossless_rate"] == 1.0 for s in cmp["drafters"].values())
    # every record says how the target's forwards ran: on the CPU no graphs, so each tree verify is eager
    records = {r["drafter"]: r for r in read_jsonl(next((tmp_path / "cmp").rglob("records.jsonl")))}
    tree_rec = records["eagle_tree"]
    assert tree_rec["target_routes"]["eager_tree:no_graphs"] >= 1
    assert sum(tree_rec["target_routes"].values()) == tree_rec["target_forwards"]
    assert set(records["target"]["target_routes"]) == {"eager"}
    with pytest.raises(SystemExit, match="no chosen drafter drafts trees"):
        cd.main(base + ["--drafters", "eventgpt", "--output_dir", str(tmp_path / "no")] + tree)


# ----- routing: a tree verify replays the tree graph on the Triton kernels, eagerly otherwise -----

class _TreeGraphs:
    """Stands in for ``CudaGraphDecoder`` (CUDA only): records ``step_tree`` calls, answers with marker logits."""

    def __init__(self, cache, kernels: bool, vocab: int):
        from types import SimpleNamespace

        self.cache, self.runner, self.vocab = cache, SimpleNamespace(kernels_on=kernels), vocab
        self.sizes, self.tree_sizes, self.calls, self.last_hidden = [1, 6, 8], [8], [], None

    def size_for(self, k):
        return next((s for s in self.sizes if s >= k), None)

    def step_tree(self, embeds, positions, rows, size):
        self.calls.append((positions.tolist(), rows.tolist(), size))
        self.cache.length += embeds.shape[0]
        return torch.full((embeds.shape[0], self.vocab), 7.0)


def _routed(kernels: bool, fixed_step: int | None, hide_prefix: bool = False, parents=(-1, -1, 0, 0, 2)):
    from common.vlm import VisualInput
    from tests.test_speculative import TinyTextVLM

    target = TinyTextVLM.make(0)
    target.decode_room = 16  # room for the padded tree step
    state = target.prefill(VisualInput(embeds=torch.zeros(3, 32)), "4 8")
    base, graphs = state.length, _TreeGraphs(state.cache, kernels, target.vocab_size)
    target.decoding.graphs, target.decoding.fixed_step = graphs, fixed_step
    mask = tree_attention_mask(list(parents), base, 1)
    if hide_prefix:
        mask[:, 0] = False
    logits = target.forward(state, [11] + [5] * len(parents), attn_mask=mask,
                            position_ids=tree_positions(list(parents), base, 1))
    target.decoding.graphs = None
    target.forward(state, [3])  # no graphs now: an eager step
    return graphs.calls, logits, base, dict(target.decoding.routes)


def test_tree_verify_replays_the_tree_graph_when_the_kernels_are_on():
    calls, logits, base, routes = _routed(kernels=True, fixed_step=8)
    assert routes == {"graph_tree": 1, "eager": 1}
    # rows: pending, nodes 0..4 (parents -1, -1, 0, 0, 2); node 4's path is pending -> 0 -> 2 -> 4
    assert calls == [([base, base + 1, base + 1, base + 2, base + 2, base + 3],
                      [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 2, 2, 3, 4, 5], [0, 1, 3, 3, 4, 5],
                       [0, 1, 4, 3, 4, 5], [0, 1, 3, 5, 4, 5]], 8)]
    assert torch.equal(logits, torch.full((6, logits.shape[1]), 7.0))
    assert _routed(kernels=True, fixed_step=None)[0][0][2] == 6  # without a fixed step: the smallest fit


@pytest.mark.parametrize("why", ["kernels off", "hidden prefix", "too many rows"])
def test_tree_verify_runs_eagerly_when_the_tree_graph_cannot_serve_it(why):
    calls, logits, _, routes = _routed(kernels=why != "kernels off", fixed_step=4 if why == "too many rows" else 8,
                                       hide_prefix=why == "hidden prefix")
    assert calls == [] and not torch.equal(logits, torch.full_like(logits, 7.0))
    reason = {"kernels off": "kernels_off", "hidden prefix": "no_tree_mask", "too many rows": "too_many_rows"}[why]
    assert routes == {f"eager_tree:{reason}": 1, "eager": 1}  # the benchmark records say why


def test_tree_row_map_refuses_masks_that_are_no_tree_of_the_positions():
    from common.tree import tree_row_map

    parents = [-1, 0, 0]
    mask, positions = tree_attention_mask(parents, 4, 1), tree_positions(parents, 4, 1)
    assert tree_row_map(mask, positions, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3, 3]]
    assert tree_row_map(mask, positions + 1, 4) is None  # positions that do not follow the mask's paths
    assert tree_row_map(mask[:, 1:], positions, 4) is None  # wrong shape


def test_lossless_numerics_uses_the_tree_step_with_trees():
    from types import SimpleNamespace

    from common.models.decoding import Decoding
    from common.pipeline import lossless_numerics, tree_tokens
    from tests.test_speculative import TinyTextVLM

    decoding = Decoding(TinyTextVLM.make(0).runner)
    decoding.graphs = _TreeGraphs(None, True, 64)
    target = SimpleNamespace(decoding=decoding)
    for topk, tokens, want in [(None, None, 6), (2, 8, 8)]:
        args = SimpleNamespace(gamma=5, tree_topk=topk, tree_tokens=tokens, lossless_reference="fixed_step")
        assert tree_tokens(args) == (tokens if topk else None)
        with lossless_numerics(target, args) as step:
            assert step == want and decoding.fixed_step == want
        assert decoding.fixed_step is None
