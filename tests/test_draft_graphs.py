"""The EAGLE draft chain at fixed shapes (common.drafters.draft_graphs): eagerly on the CPU it equals the eager
head's chain; on CUDA (marker ``gpu``) its graphs propose exactly what it proposes eagerly, losslessly."""

from __future__ import annotations

import pytest
import torch

from common.drafters.draft_graphs import HeadChain, cut_after_stop, draft_chain
from common.drafters.eagle_head import (
    EagleDrafter,
    EagleHead,
    EagleHeadConfig,
    EagleTarget,
    eager_tree,
    resolve_chain_mode,
)
from common.speculative import autoregressive_generate, speculative_generate
from common.tree import TreeConfig

H, V, LIMIT = 32, 50, 45


def _bare_head(dtype=torch.float64, device="cpu") -> EagleHead:
    """A random head bound to random (V, H) LM-head and embedding weights; ids >= LIMIT never proposed."""
    torch.manual_seed(0)
    head = EagleHead(EagleHeadConfig(hidden_size=H, num_heads=4, intermediate_size=48)).to(device, dtype).eval()
    lm, emb = (torch.randn(V, H, dtype=dtype, device=device) for _ in range(2))
    return head.bind(lm_head=lm, embed_tokens=emb, vocab_limit=LIMIT)


def _eager_chain(head, root, cache, gamma):
    """The eager drafter's loop: argmax of the LM head, fed back one head step at a time."""
    tokens, feature = [], root
    for i in range(gamma):
        tokens.append(int(head.logits(feature).argmax()))
        if i < gamma - 1:
            feature = head.step(feature[None], tokens[-1:], cache)[-1]
    return tokens


@torch.no_grad()
def test_static_step_over_the_whole_capacity_equals_the_growing_cache_step():
    head = _bare_head()
    feats, ids = torch.randn(9, H, dtype=torch.float64), list(range(3, 12))
    cache = head.new_cache(4)  # grows
    ref = head.step(feats, ids, cache)
    keys, values = (torch.zeros(1, 4, 40, H // 4, dtype=torch.float64) for _ in range(2))
    first = head.static_step(feats[:7], torch.tensor(ids[:7]), torch.arange(7), keys, values)
    second = head.static_step(feats[7:], torch.tensor(ids[7:]), torch.arange(7, 9), keys, values)
    assert torch.allclose(torch.cat([first, second]), ref, atol=1e-12)
    assert torch.allclose(keys[:, :, :9], cache.keys[:, :, :9], atol=1e-12)
    assert keys[:, :, 9:].abs().sum() == 0  # nothing written past the fed rows


@torch.no_grad()
def test_padded_commits_and_the_chain_equal_the_eager_head():
    head = _bare_head()
    feats, ids = torch.randn(13, H, dtype=torch.float64), [(5 * i + 3) % V for i in range(13)]
    cache = head.new_cache()
    ref = head.step(feats[:10], ids[:10], cache)
    chain = HeadChain(head, capacity=32, commit_size=4, graphs=False)
    out = chain.commit(feats[:10], ids[:10])  # 4 + 4 + 2 real rows (2 padded)
    assert out.shape == (10, H) and chain.cache.length == 10
    assert torch.allclose(out, ref, atol=1e-12)
    # the padded rows' keys were written past the length but never attended: later rows still agree
    more_ref = head.step(feats[10:], ids[10:], cache)
    assert torch.allclose(chain.commit(feats[10:], ids[10:]), more_ref, atol=1e-12)
    expected = _eager_chain(head, more_ref[-1], cache, 6)
    assert chain.chain(more_ref[-1], 6) == expected
    assert all(t < LIMIT for t in expected)
    assert chain.cache.length == 13  # the chain's positions are temporary
    assert chain.chain(more_ref[-1], 6) == expected  # and repeatable
    assert chain.chain(more_ref[-1], 2) == expected[:2] and chain.chain(more_ref[-1], 0) == []
    step = chain.step(more_ref[-1], expected[0])  # the chain's own one-row step, eagerly
    assert chain.cache.length == 14
    assert int(head.logits(step).argmax()) == expected[1]


@torch.no_grad()
def test_the_static_cache_never_grows():
    head = _bare_head()
    chain = HeadChain(head, capacity=12, commit_size=4, graphs=False)
    feats = torch.randn(9, H, dtype=torch.float64)
    assert chain.fits(12) and not chain.fits(13)
    chain.commit(feats[:8], list(range(8)))
    chain.commit(feats[8:], [8])  # its padded step writes positions 8..11: the last that fit
    assert chain.cache.length == 9 and chain.cache.keys.shape[2] == 12
    with pytest.raises(ValueError, match="do not fit"):
        chain.commit(feats[:1], [1])  # positions 9..12
    assert chain.cache.length == 9 and len(chain.chain(feats[0], 4)) == 4  # temporary positions 9..11
    with pytest.raises(ValueError, match="does not fit"):
        chain.chain(feats[0], 5)


@torch.no_grad()
def test_draft_chain_function_is_the_eager_loop():
    head = _bare_head()
    cache = head.new_cache()
    root = torch.randn(H, dtype=torch.float64)
    keys, values = (torch.zeros(1, 4, 16, H // 4, dtype=torch.float64) for _ in range(2))
    tokens = draft_chain(head, root, torch.tensor([0]), keys, values, 5)
    assert tokens.dtype == torch.long and tokens.shape == (5,)
    assert tokens.tolist() == _eager_chain(head, root, cache, 5)
    assert draft_chain(head, root, torch.tensor([0]), keys, values, 1).tolist() == [int(head.logits(root).argmax())]


def test_chain_modes():
    head = _bare_head(torch.float32)
    assert resolve_chain_mode("auto", head, object()) == "eager"  # CPU, no target graphs
    assert resolve_chain_mode("static", head, object()) == "static"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_chain_mode("graph", head, object())
    with pytest.raises(ValueError, match="chain must be one of"):
        resolve_chain_mode("fast", head, object())


# ----- draft trees at fixed shapes (HeadChain.tree) -----

def _tree_pair(head, context: int, seed: int):
    """An eager head cache and a static chain holding the same ``context`` rows; and a root feature."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(context + 1, H, dtype=torch.float64, generator=gen)
    ids = torch.randint(0, LIMIT, (context,), generator=gen).tolist()
    cache = head.new_cache()
    head.step(feats[:context], ids, cache)
    chain = HeadChain(head, capacity=96, commit_size=4, graphs=False)
    chain.commit(feats[:context], ids)
    return cache, chain, feats[context]


def _same_tree(static, eager):
    assert static.tokens == eager.tokens and static.parents == eager.parents
    assert static.scores == pytest.approx(eager.scores, abs=1e-6) and not static.probs


@pytest.mark.parametrize("topk", [2, 4])
@pytest.mark.parametrize("tokens", [7, 17])  # node budgets 6 and 16
@torch.no_grad()
def test_static_tree_equals_the_eager_tree(topk, tokens):
    head = _bare_head()
    config = TreeConfig(topk=topk, tokens=tokens)
    depths = set()
    for seed, context in ((0, 5), (1, 11), (2, 1), (3, 8)):
        cache, chain, root = _tree_pair(head, context, seed)
        first = torch.topk(head.logits(root), topk).indices.tolist()
        for stops in (frozenset(), frozenset(first[:1]), frozenset(first[1:2])):  # a stop token in play
            for max_depth in (config.max_depth, 2):
                eager, steps = eager_tree(head, cache, root, config, max_depth, stops)
                cache.truncate(context)
                static, expansions = chain.tree(root, config, max_depth, stops)
                _same_tree(static, eager)
                assert expansions == steps and chain.cache.length == context  # its rows were temporary
                assert 0 < len(static) <= config.nodes and static.depth <= max_depth
                depths.add(static.depth)
                if stops:
                    assert not any(static.parents[i] >= 0 and static.tokens[static.parents[i]] in stops
                                   for i in range(len(static)))  # a stop token is never expanded
    assert max(depths) >= 3  # deep trees (padded frontiers and the ancestor masks) were compared


@torch.no_grad()
def test_static_tree_sees_only_ancestors():
    """A node's step attends the context, its ancestors and itself: a sibling branch's rows change nothing."""
    head = _bare_head()
    cache, chain, root = _tree_pair(head, 6, 4)
    config = TreeConfig(topk=3, tokens=16)
    tree, _ = chain.tree(root, config, config.max_depth)
    assert tree.depth >= 3 and len(set(tree.parents)) > 2  # a bushy tree
    for node in range(len(tree)):  # the node's own path, fed as a chain, predicts its children's scores
        path = [node]
        while tree.parents[path[-1]] >= 0:
            path.append(tree.parents[path[-1]])
        path.reverse()
        feats = [root]
        for j in path:
            feats.append(head.step(feats[-1][None], [tree.tokens[j]], cache)[-1])
        cache.truncate(6)
        logprobs = torch.log_softmax(head.logits(feats[-1]), dim=-1)
        for child in tree.children(node):
            assert tree.scores[child] == pytest.approx(tree.scores[node] + float(logprobs[tree.tokens[child]]),
                                                       abs=1e-5)


def test_static_tree_refuses_a_tree_that_does_not_fit():
    head = _bare_head()
    chain = HeadChain(head, capacity=20, commit_size=4, graphs=False)
    chain.commit(torch.randn(10, H, dtype=torch.float64), list(range(10)))
    config = TreeConfig(topk=4, tokens=8)
    assert chain.tree_rows(config, 50) == 4 * 6 and chain.tree_rows(config, 3) == 8
    assert not chain.fits(chain.tree_rows(config, 50))
    with pytest.raises(ValueError, match="does not fit the static head cache"):
        chain.tree(torch.randn(H, dtype=torch.float64), config, 50)
    tree, _ = chain.tree(torch.randn(H, dtype=torch.float64), config, 3)  # 8 rows fit
    assert 0 < len(tree) <= 7 and tree.depth <= 3


# ----- the drafter on a real (tiny) decoder -----

class Recording:
    """A drafter wrapper that records every proposal's tokens (and every tree: tokens, parents)."""

    def __init__(self, drafter):
        self.drafter, self.name, self.proposals = drafter, drafter.name, []

    def propose(self, context, gamma):
        proposal = self.drafter.propose(context, gamma)
        self.proposals.append(list(proposal.tokens))
        return proposal

    def propose_tree(self, context, config, max_depth):
        tree = self.drafter.propose_tree(context, config, max_depth)
        self.proposals.append((list(tree.tokens), list(tree.parents)))
        return tree


def _tiny():
    from common.vlm import VisualInput
    from tests.test_speculative import TinyTextVLM

    return TinyTextVLM.make(0), VisualInput(embeds=torch.zeros(3, 32))


def _run(target, visual, question, head, gamma, new, **kw):
    proxy = EagleTarget(target, -1)
    state = proxy.prefill(visual, question)
    drafter = EagleDrafter(head, proxy, state, stop_token_ids=(), **kw)
    rec = Recording(drafter)
    result = speculative_generate(proxy, state, rec, max_new_tokens=new, gamma=gamma, stop_token_ids=())
    return result, rec.proposals, drafter


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_static_chain_drafter_proposes_the_eager_drafters_tokens(gamma):
    target, visual = _tiny()
    torch.manual_seed(4)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    for question in ("5 9 13", "7 7 21 40"):
        expected = autoregressive_generate(target, target.prefill(visual, question), max_new_tokens=24,
                                           stop_token_ids=()).tokens
        eager, eager_props, d0 = _run(target, visual, question, head, gamma, 24, chain="eager")
        static, static_props, d1 = _run(target, visual, question, head, gamma, 24, chain="static")
        assert d0.chain_mode == "eager" and d1.chain_mode == "static"
        assert eager.tokens == static.tokens == expected
        assert static_props == eager_props and any(static_props)
        assert static.iterations == eager.iterations
        assert d1.stats["committed_positions"] == d0.stats["committed_positions"] > 0
        assert d1.stats.steps == d0.stats.steps


def test_drafters_sharing_a_head_take_the_static_cache_in_turn():
    target, visual = _tiny()
    torch.manual_seed(5)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    runs = []
    for chain in ("eager", "static"):
        proxies = [EagleTarget(target, -1) for _ in range(2)]
        states = [p.prefill(visual, q) for p, q in zip(proxies, ("5 9 13", "1 2"))]
        drafters = [EagleDrafter(head, p, s, stop_token_ids=(), chain=chain) for p, s in zip(proxies, states)]
        contexts: list[list[int]] = [[], []]
        proposals = []
        for step in range(8):  # interleaved; the context grows past what the target verified (temporary rows)
            i = step % 2
            tokens = drafters[i].propose(contexts[i], 3).tokens
            proposals.append(tokens)
            contexts[i] = contexts[i] + tokens[:2]
        runs.append(proposals)
    assert runs[0] == runs[1] and all(runs[0])


def test_static_chain_falls_back_to_eager_when_the_cache_is_full():
    target, visual = _tiny()
    torch.manual_seed(6)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    expected = autoregressive_generate(target, target.prefill(visual, "5 9 13"), max_new_tokens=30,
                                       stop_token_ids=()).tokens
    result, props, drafter = _run(target, visual, "5 9 13", head, 3, 30, chain="static", chain_capacity=20)
    assert result.tokens == expected
    assert drafter.chain_mode == "eager"  # left the 20-position chain on the way
    _, eager_props, _ = _run(target, visual, "5 9 13", head, 3, 30, chain="eager")
    assert props == eager_props


def test_tree_drafting_on_the_static_chain_is_lossless():
    target, visual = _tiny()
    torch.manual_seed(7)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    expected = autoregressive_generate(target, target.prefill(visual, "7 7 21 40"), max_new_tokens=20,
                                       stop_token_ids=()).tokens
    proxy = EagleTarget(target, -1)
    state = proxy.prefill(visual, "7 7 21 40")
    drafter = EagleDrafter(head, proxy, state, stop_token_ids=(), chain="static")
    result = speculative_generate(proxy, state, drafter, max_new_tokens=20, gamma=0, stop_token_ids=(),
                                  tree=TreeConfig(topk=3, tokens=6))
    assert result.tokens == expected


@pytest.mark.parametrize("topk, tokens", [(2, 7), (4, 17)])
def test_static_tree_drafter_proposes_the_eager_drafters_trees(topk, tokens):
    target, visual = _tiny()
    torch.manual_seed(8)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    question = "5 9 13"
    expected = autoregressive_generate(target, target.prefill(visual, question), max_new_tokens=30,
                                       stop_token_ids=()).tokens
    runs = {}
    for chain in ("static", "eager"):
        proxy = EagleTarget(target, -1)
        state = proxy.prefill(visual, question)
        drafter = EagleDrafter(head, proxy, state, stop_token_ids=(), chain=chain)
        rec = Recording(drafter)
        result = speculative_generate(proxy, state, rec, max_new_tokens=30, gamma=0, stop_token_ids=(),
                                      tree=TreeConfig(topk=topk, tokens=tokens))
        assert result.tokens == expected and drafter.chain_mode == chain
        runs[chain] = (rec.proposals, drafter.stats.steps, result.iterations)
    assert runs["static"] == runs["eager"]  # the same trees, head steps and accepted lengths
    assert max(len(tokens) for tokens, _ in runs["static"][0]) == tokens - 1


def test_static_tree_drafter_leaves_a_full_chain_for_eager_trees():
    target, visual = _tiny()
    torch.manual_seed(8)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target).eval()
    config = TreeConfig(topk=4, tokens=9)
    expected = autoregressive_generate(target, target.prefill(visual, "5 9 13"), max_new_tokens=24,
                                       stop_token_ids=()).tokens
    runs = []
    for kw in ({"chain": "static", "chain_capacity": 60}, {"chain": "eager"}):
        proxy = EagleTarget(target, -1)
        state = proxy.prefill(visual, "5 9 13")
        drafter = EagleDrafter(head, proxy, state, stop_token_ids=(), **kw)
        rec = Recording(drafter)
        result = speculative_generate(proxy, state, rec, max_new_tokens=24, gamma=0, stop_token_ids=(), tree=config)
        assert result.tokens == expected
        runs.append((rec.proposals, drafter.chain_mode))
    assert runs[0][1] == "eager"  # a tree's 4 x 7 rows past the context no longer fit 60 positions: left the chain
    assert runs[0][0] == runs[1][0]


# ----- the L5 adapter's chain -----

def _l5(dtype=torch.float64, device="cpu", hidden_in=24, hidden_out=32, vocab=V):
    from common.drafters.hidden_adapter import create_adapter

    torch.manual_seed(1)
    adapter = create_adapter(5, hidden_in, hidden_out, vocab_size=vocab, num_heads=4, num_layers=2)
    torch.nn.init.normal_(adapter.out.weight, std=0.3)  # a fresh trunk predicts "no change"; make it move
    return adapter.to(device, dtype).eval()


@torch.no_grad()
def test_l5_chain_over_a_kv_cache_equals_the_full_history_recompute():
    adapter = _l5()
    lm = torch.randn(V, 32, dtype=torch.float64)
    states = torch.randn(12, 24, dtype=torch.float64)
    context = [(7 * i + 3) % V for i in range(11)]
    chain = adapter.draft_chain(lm, LIMIT, capacity=40, commit_size=4)
    assert adapter.draft_chain(lm, LIMIT, capacity=40, commit_size=4) is chain  # shared per configuration
    aligned = adapter.align(states)
    chain.commit(aligned[:5], context[:5])
    chain.commit(aligned[5:11], context[5:])  # 4 + 2 rows
    assert chain.cache.length == 11
    for gamma in (1, 2, 6):
        expected = adapter.speculative_decode(states, context, lm, gamma, LIMIT)
        assert chain.chain(aligned[-1], gamma) == expected
    full = adapter.speculative_decode(states, context, lm, 6, LIMIT)
    stop = frozenset({full[2]})
    assert cut_after_stop(chain.chain(aligned[-1], 6), stop) == adapter.speculative_decode(
        states, context, lm, 6, LIMIT, stop)
    assert len(set(full)) > 1  # the chain moves in feature space


def test_l5_drafter_on_the_static_chain_proposes_the_eager_drafters_tokens(models):
    from common.data import ClipDataset
    from common.defaults import default_dataset_dir
    from common.drafters.hidden_drafter import HiddenAdapterDrafter
    from common.pipeline import prefill_sample

    draft, target = models
    sample = list(ClipDataset(default_dataset_dir()))[0]
    adapter = _l5(torch.float64, hidden_in=draft.hidden_size, hidden_out=target.hidden_size, vocab=target.vocab_size)
    limit = min(draft.base_vocab_size, target.base_vocab_size)
    expected = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=16).tokens
    runs = {}
    with torch.no_grad():
        visual = draft.encode(sample)
        for chain in ("eager", "static"):
            state = draft.prefill(visual, sample.question, hidden_layers=[-1])
            drafter = HiddenAdapterDrafter(adapter, draft, state, target.lm_head, vocab_limit=limit,
                                           stop_token_ids=[target.eos_token_id], chain=chain)
            rec = Recording(drafter)
            result = speculative_generate(target, prefill_sample(target, sample).state, rec, max_new_tokens=16,
                                          gamma=4)
            assert result.tokens == expected
            runs[chain] = (rec.proposals, drafter.chain_mode, result.iterations)
    assert runs["static"][1] == "static" and runs["eager"][1] == "eager"
    assert runs["static"][0] == runs["eager"][0] and any(runs["eager"][0])
    assert runs["static"][2] == runs["eager"][2]


# ----- CUDA graphs (run on the GPU machine) -----

def _gpu_target(tiny_models_dir, quant="fp32"):
    from common.models.loader import load_vlm

    target = load_vlm("videollava", tiny_models_dir / "videollava", quant=quant, device="cuda")
    # every step a padded 6-token graph step through the same (stock) kernels, with or without the features,
    # so the target's decode and the EAGLE wrapper's verify agree bitwise (lossless even in bf16)
    target.enable_cuda_graphs(512, step_sizes=(1, 6), fixed_step=6, kernels=False)
    return target


def _gpu_visual(vlm):
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    return vlm.encode_pixels(vlm.preprocess(frames))


@pytest.mark.gpu
@torch.no_grad()
def test_graphed_head_chain_replays_its_eager_run():
    head = _bare_head(torch.float32, "cuda")
    graphed = HeadChain(head, capacity=64, commit_size=6, graphs=True)
    static = HeadChain(head, capacity=64, commit_size=6, graphs=False)
    feats = torch.randn(20, H, device="cuda")
    ids = [(7 * i + 2) % V for i in range(20)]
    for lo, hi in ((0, 9), (9, 10), (10, 16), (16, 20)):  # chunked, single-row and full-bucket commits
        rows_g, rows_s = graphed.commit(feats[lo:hi], ids[lo:hi]), static.commit(feats[lo:hi], ids[lo:hi])
        assert torch.allclose(rows_g, rows_s, rtol=0, atol=1e-5)  # the same kernels (bitwise in practice)
        for gamma in (1, 3, 5):
            assert graphed.chain(rows_g[-1], gamma) == static.chain(rows_s[-1], gamma)
    assert graphed.cache.length == static.cache.length == 20
    assert torch.allclose(graphed.cache.keys[:, :, :20], static.cache.keys[:, :, :20], rtol=0, atol=1e-5)
    ms = graphed.replay_ms(5, repeats=5)
    assert ms["commit_ms"] > 0 and ms["chain_ms"] > 0
    assert graphed.cache.length == 20  # the timing replays ran past the live positions


QUESTION = "What are the key elements in this scene?"


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp32", "bf16"])
def test_graphed_drafter_is_lossless_and_proposes_the_static_chains_tokens(tiny_models_dir, quant):
    target = _gpu_target(tiny_models_dir, quant)
    torch.manual_seed(8)
    head = EagleHead(EagleHeadConfig.for_target(target)).to("cuda", target.dtype).eval().bind(target)
    with torch.no_grad():
        visual = _gpu_visual(target)
        expected = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=30).tokens
        runs = {}
        for chain in ("auto", "graph", "static", "eager"):
            proxy = EagleTarget(target, -1)
            state = proxy.prefill(visual, QUESTION)
            drafter = EagleDrafter(head, proxy, state, chain=chain)
            rec = Recording(drafter)
            result = speculative_generate(proxy, state, rec, max_new_tokens=30, gamma=5)
            assert result.tokens == expected, chain
            runs[chain] = (rec.proposals, drafter.chain_mode)
    assert runs["auto"][1] == runs["graph"][1] == "graph" and runs["static"][1] == "static"
    assert runs["graph"][0] == runs["auto"][0] and any(runs["graph"][0])  # the same replays
    if quant == "fp32":  # bf16 logits tie often: only fp32 is compared across kernels
        assert runs["graph"][0] == runs["static"][0]


@pytest.mark.gpu
def test_eagle_wrapper_follows_the_targets_graphs_when_they_are_captured_again(tiny_models_dir):
    """Graphs captured again (a new decoder may reuse a freed one's id): the wrapper replays the new ones."""
    from common.models.decoding import counting_routes

    target = _gpu_target(tiny_models_dir)
    with torch.no_grad():
        visual = _gpu_visual(target)
        for question in (QUESTION, "Describe the scene.", "What moves on the road?"):
            target.disable_cuda_graphs()
            target.enable_cuda_graphs(512, step_sizes=(1, 6), fixed_step=6, kernels=False)
            expected = target.forward(target.prefill(visual, question), [5, 9])
            proxy = EagleTarget(target, -1)
            state = proxy.prefill(visual, question)
            with counting_routes(target) as routes:
                got = proxy.forward(state, [5, 9])
            assert torch.equal(got, expected) and routes == {"graph": 1}, question


@pytest.mark.gpu
def test_tree_drafting_beside_the_graphed_chain_is_lossless(tiny_models_dir):
    target = _gpu_target(tiny_models_dir)
    torch.manual_seed(9)
    head = EagleHead(EagleHeadConfig.for_target(target)).to("cuda", target.dtype).eval().bind(target)
    with torch.no_grad():
        visual = _gpu_visual(target)
        expected = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=24).tokens
        proxy = EagleTarget(target, -1)
        state = proxy.prefill(visual, QUESTION)
        drafter = EagleDrafter(head, proxy, state)
        chain = speculative_generate(proxy, state, drafter, max_new_tokens=24, gamma=5)  # graphs captured
        assert chain.tokens == expected and drafter.chain_mode == "graph"
        trees = {}
        for mode in ("auto", "static"):
            proxy = EagleTarget(target, -1)
            state = proxy.prefill(visual, QUESTION)
            drafter = EagleDrafter(head, proxy, state, chain=mode)
            rec = Recording(drafter)
            tree = speculative_generate(proxy, state, rec, max_new_tokens=24, gamma=0,
                                        tree=TreeConfig(topk=3, tokens=6))  # graphed expansions on the shared cache
            assert tree.tokens == expected and drafter.chain_mode == ("graph" if mode == "auto" else "static")
            assert drafter.stats.proposals > 0 and drafter.stats.tokens_proposed > 0
            trees[mode] = rec.proposals
    assert trees["auto"] == trees["static"] and any(tokens for tokens, _ in trees["auto"])  # fp32: the same trees


@pytest.mark.gpu
@torch.no_grad()
def test_graphed_tree_replays_its_static_run():
    """bf16 head: the CUDA graphs of the root and k-row expansion steps build bitwise the static path's trees."""
    head = _bare_head(torch.bfloat16, "cuda")
    feats = torch.randn(20, H, device="cuda", dtype=torch.bfloat16)
    ids = [(3 * i + 2) % LIMIT for i in range(19)]
    graphed = HeadChain(head, capacity=128, commit_size=4, graphs=True)
    static = HeadChain(head, capacity=128, commit_size=4, graphs=False)
    depths = set()
    for lo, hi in ((0, 7), (7, 12), (12, 19)):
        graphed.commit(feats[lo:hi], ids[lo:hi])
        static.commit(feats[lo:hi], ids[lo:hi])
        root = feats[hi]
        first = torch.topk(head.logits(root), 2).indices.tolist()
        for topk, tokens in ((2, 7), (4, 17)):
            config = TreeConfig(topk=topk, tokens=tokens)
            for stops in (frozenset(), frozenset(first[:1])):
                a, steps_a = graphed.tree(root, config, config.max_depth, stops)
                b, steps_b = static.tree(root, config, config.max_depth, stops)
                assert (a.tokens, a.parents, a.scores, steps_a) == (b.tokens, b.parents, b.scores, steps_b)
                assert graphed.cache.length == hi
                depths.add(a.depth)
    assert max(depths) >= 2
    ms = graphed.tree_replay_ms(TreeConfig(topk=4, tokens=17), repeats=5)
    assert ms["root_ms"] > 0 and ms["expand_ms"] > 0


@pytest.mark.gpu
@torch.no_grad()
def test_graphed_l5_chain_replays_its_eager_run():
    adapter = _l5(torch.float32, "cuda")
    lm = torch.randn(V, 32, device="cuda")
    graphed = adapter.draft_chain(lm, LIMIT, capacity=64, commit_size=6, graphs=True)
    static = adapter.draft_chain(lm, LIMIT, capacity=64, commit_size=6, graphs=False)
    assert graphed is not static
    aligned = adapter.align(torch.randn(21, 24, device="cuda"))
    context = [(5 * i + 1) % V for i in range(20)]
    for lo, hi in ((0, 9), (9, 10), (10, 16), (16, 20)):
        graphed.commit(aligned[lo:hi], context[lo:hi])
        static.commit(aligned[lo:hi], context[lo:hi])
        for gamma in (1, 5):
            assert graphed.chain(aligned[hi], gamma) == static.chain(aligned[hi], gamma)
    ms = graphed.replay_ms(5, repeats=5)
    assert ms["commit_ms"] > 0 and ms["chain_ms"] > 0
