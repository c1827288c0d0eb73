"""Tree verification on the Triton decode kernels: each tree row equals the causal step at its virtual position.

CPU: under Triton's interpreter only (``TRITON_INTERPRET=1``, as tests/test_kernels.py), fp32. GPU
(``-m gpu``): bf16, CUDA graphs, bitwise against the target's own fixed-step decode.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 from the start", allow_module_level=True)
pytest.importorskip("triton")

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaModel  # noqa: E402

from common.models import kernels  # noqa: E402
from common.models.decoder import LlamaRunner, TreeRows  # noqa: E402
from common.tree import tree_attention_mask, tree_positions, tree_row_map  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARENTS = [-1, -1, 0, 0, 1, 2, 5]  # root's children 0, 1; a path 0 -> 2 -> 5 -> 6 of depth 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _tree(start: int, pending: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(virtual positions (k,), fed-row map (k, k)) of PARENTS verified at cache length ``start``."""
    mask = tree_attention_mask(PARENTS, start, pending, DEVICE)
    positions = tree_positions(PARENTS, start, pending, DEVICE)
    rows = tree_row_map(mask, positions, start)
    assert rows is not None
    return positions, rows


def _cache(capacity: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, capacity, HEAD_DIM, generator=g).to(DEVICE)
    values = torch.randn(KV_HEADS, capacity, HEAD_DIM, generator=g).to(DEVICE)
    return keys, values


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: list[int], masked_prefix: int
               ) -> torch.Tensor:
    """One row's attention over the cache slots ``slots`` in virtual order (float64)."""
    idx = torch.tensor(slots, device=keys.device)
    k = keys[:, idx].double().repeat_interleave(HEADS // KV_HEADS, 0)
    v = values[:, idx].double().repeat_interleave(HEADS // KV_HEADS, 0)
    s = torch.einsum("hd,hnd->hn", q.double(), k) * HEAD_DIM ** -0.5
    if masked_prefix:
        s[:, :masked_prefix] = float("-inf")
    return torch.einsum("hn,hnd->hd", s.softmax(-1), v).reshape(-1)


# the region crosses a key block (121), a split chunk (125; 30 with 16-position chunks) or neither (60)
@pytest.mark.parametrize("start,masked_prefix,split", [(121, 0, 128), (121, 40, 128), (60, 0, 128), (125, 0, 128),
                                                       (30, 0, 16), (30, 20, 16)])
def test_tree_attention_equals_per_row_path_attention(start, masked_prefix, split):
    """Row r attends the cache below ``start`` and then exactly its pending rows and ancestors, in order."""
    positions, rows = _tree(start)
    k = len(PARENTS) + 1
    keys, values = _cache()
    q = torch.randn(k, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = kernels.decode_attention(q, keys, values, positions, HEAD_DIM ** -0.5, masked_prefix=masked_prefix,
                                   tree_slots=rows + start, split=split)
    for r in range(k):
        path = [start + int(rows[r, j]) for j in range(int(positions[r]) - start + 1)]
        want = _reference(q[r], keys, values, list(range(start)) + path, masked_prefix)
        torch.testing.assert_close(out[r].double(), want, atol=1e-5, rtol=1e-5)


def test_identity_map_equals_no_map_exactly():
    """A causal step given as a tree (every row on one path) computes what the plain kernel computes."""
    keys, values = _cache()
    start, k = 121, 8
    positions = torch.arange(start, start + k, device=DEVICE)
    q = torch.randn(k, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    plain = kernels.decode_attention(q, keys, values, positions, HEAD_DIM ** -0.5)
    ident = positions.expand(k, k).contiguous()
    assert torch.equal(kernels.decode_attention(q, keys, values, positions, HEAD_DIM ** -0.5, tree_slots=ident), plain)


@pytest.mark.parametrize("start", [121, 125])  # the region inside one split chunk, or across two
def test_tree_row_equals_the_causal_step_at_its_position_bitwise(start):
    """Each tree row's output is the causal kernel's at its virtual position over a cache holding its path."""
    keys, values = _cache()
    positions, rows = _tree(start)
    k = len(PARENTS) + 1
    q = torch.randn(k, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    tree_out = kernels.decode_attention(q, keys, values, positions, HEAD_DIM ** -0.5, tree_slots=rows + start)
    for r in range(k):
        depth = int(positions[r]) - start
        seq_k, seq_v = keys.clone(), values.clone()
        src = torch.tensor([start + int(rows[r, j]) for j in range(depth + 1)], device=DEVICE)
        seq_k[:, start:start + depth + 1], seq_v[:, start:start + depth + 1] = keys[:, src], values[:, src]
        # a causal step of k rows holding this token in row r (other rows: earlier positions)
        at = torch.arange(int(positions[r]) - r, int(positions[r]) - r + k, device=DEVICE).clamp(max=int(positions[r]))
        qs = q.clone()
        seq = kernels.decode_attention(qs, seq_k, seq_v, at, HEAD_DIM ** -0.5)
        assert torch.equal(tree_out[r], seq[r]), r


def _runner(hidden: int = 64) -> LlamaRunner:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512)
    return LlamaRunner(LlamaModel(cfg).eval().to(DEVICE), torch.nn.Linear(hidden, 100, bias=False).to(DEVICE))


def test_fused_tree_step_equals_the_eager_tree_verify():
    """static_step with TreeRows: logits of every row as the eager masked forward; the path's keys compact alike."""
    runner = _runner()
    start = 125
    mask = tree_attention_mask(PARENTS, start, 1, DEVICE)
    positions = tree_positions(PARENTS, start, 1, DEVICE)
    rows = tree_row_map(mask, positions, start)
    k = len(PARENTS) + 1
    with torch.no_grad():
        cache = runner.new_cache(300, torch.float32, DEVICE)
        runner.run(torch.randn(1, start, 64, device=DEVICE), cache)
        embeds = torch.randn(1, k, 64, device=DEVICE)
        eager_cache, fused_cache = cache.clone(), cache.clone()
        want, _ = runner.run(embeds, eager_cache, attn_mask=mask, position_ids=positions)
        assert runner.use_kernels(True)
        slots = torch.arange(start, start + k, device=DEVICE)
        got, _ = runner.static_step(embeds, slots, fused_cache, TreeRows(positions, rows + start))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.keys[..., start:start + k, :], eager_cache.keys[..., start:start + k, :],
                               atol=1e-5, rtol=1e-5)


def test_tree_step_needs_the_kernels():
    runner = _runner()
    cache = runner.new_cache(64, torch.float32, DEVICE)
    slots = torch.arange(0, 2, device=DEVICE)
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        runner.static_step(torch.zeros(1, 2, 64, device=DEVICE), slots, cache, TreeRows(slots, slots.expand(2, 2)))


# ----- GPU: bf16, CUDA graphs, bitwise the target's own fixed-step decode -----

STEP = 8  # --tree_tokens: the fixed step of the target alone and the rows of a tree verify


def _gpu_target(seed: int = 0):
    """A small random LLaMA behind the VLM interface, bf16 on CUDA (head size 64), graphs + kernels at STEP."""
    from tests.test_speculative import TinyTextVLM

    target = TinyTextVLM.make(seed, hidden=256, device="cuda", dtype=torch.bfloat16)
    target.enable_cuda_graphs(512, step_sizes=(1, 6), fixed_step=STEP, tree_step=STEP)
    assert target.runner.kernels_on and target.graphs.tree_sizes == [STEP]
    return target


def _visual(target):
    from common.vlm import VisualInput

    g = torch.Generator().manual_seed(5)
    # 185 prompt rows + 3 question tokens: the tree region (188..195) crosses a key block (192)
    return VisualInput(embeds=torch.randn(185, 256, generator=g).to("cuda", torch.bfloat16))


@pytest.mark.gpu
def test_tree_verify_rows_equal_fixed_step_decode_bitwise():
    """Every node's logits from one graphed tree verify equal feeding its path alone, bit for bit; after
    compaction onto a path the next steps are bitwise those of the sequential decode."""
    from common.tree import DraftTree

    target = _gpu_target()
    visual, question = _visual(target), "5 9 13"
    tokens = [5, 9, 13, 7, 21, 30, 11]
    tree = DraftTree(tokens=tokens, parents=PARENTS)
    path = [0, 2, 5, 6]

    def verify(compact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = target.prefill(visual, question)  # each prefill reuses the one static cache
        base = state.length
        logits = target.forward(state, [3] + tokens, attn_mask=tree_attention_mask(PARENTS, base, 1, "cuda"),
                                position_ids=tree_positions(PARENTS, base, 1, "cuda"))
        if not compact:
            return logits, None
        target.compact(state, base, [0] + [1 + j for j in path])
        return logits, target.forward(state, [4, 8, 15])

    with torch.no_grad():
        logits, _ = verify(compact=False)
        for i in range(len(tokens)):
            ref = target.forward(target.prefill(visual, question), [3] + tree.path_tokens(i))
            assert torch.equal(logits[0], ref[0]) and torch.equal(logits[1 + i], ref[-1]), i
        _, after = verify(compact=True)
        ref_state = target.prefill(visual, question)
        target.forward(ref_state, [3] + [tokens[j] for j in path])
        assert torch.equal(after, target.forward(ref_state, [4, 8, 15]))


class _OracleTree:
    """Trees holding the target's true continuation (depth 1..3) beside a wrong sibling at every depth."""

    name = "oracle_tree"

    def __init__(self, reference: list[int], vocab: int):
        self.reference, self.vocab, self.stats = reference, vocab, {"steps": 0}

    def propose_tree(self, context, config, max_depth):
        from common.tree import DraftTree

        n = len(context)
        truth = self.reference[n:n + min(1 + n % 3, max_depth, config.nodes // 2)]
        tree, parent = DraftTree(), -1
        for t in truth:  # the wrong sibling first, so the accepted rows are not the first ones
            tree.tokens += [(t + 1) % self.vocab, t]
            tree.parents += [parent, parent]
            parent = len(tree.tokens) - 1
        self.stats["steps"] += 1
        return tree


@pytest.mark.gpu
def test_greedy_tree_runs_equal_the_target_alone_under_lossless_numerics():
    """The engine with trees (an oracle tree drafter on the target and on EagleTarget, and an EAGLE head)
    emits the target's own fixed-step greedy tokens."""
    from types import SimpleNamespace

    from common.drafters.eagle_head import EagleDrafter, EagleHead, EagleHeadConfig, EagleTarget
    from common.pipeline import lossless_numerics
    from common.speculative import autoregressive_generate, speculative_generate
    from common.tree import TreeConfig

    target = _gpu_target()
    target.use_fixed_step(None)
    visual, question = _visual(target), "5 9 13"
    args = SimpleNamespace(gamma=5, tree_topk=2, tree_tokens=STEP, lossless_reference="fixed_step")
    config = TreeConfig(topk=2, tokens=STEP)
    with torch.no_grad(), lossless_numerics(target, args) as step:
        assert step == STEP
        reference = autoregressive_generate(target, target.prefill(visual, question), max_new_tokens=40,
                                            stop_token_ids=()).tokens
        proxy = EagleTarget(target, -1)
        for model in (target, proxy):
            state = model.prefill(visual, question)
            run = speculative_generate(model, state, _OracleTree(reference, target.base_vocab_size),
                                       max_new_tokens=40, gamma=0, stop_token_ids=(), tree=config)
            assert run.tokens == reference and run.num_accepted > 20
        torch.manual_seed(0)
        head = EagleHead(EagleHeadConfig.for_target(target)).to("cuda", target.dtype).eval().bind(target)
        state = proxy.prefill(visual, question)
        run = speculative_generate(proxy, state, EagleDrafter(head, proxy, state, stop_token_ids=()),
                                   max_new_tokens=40, gamma=0, stop_token_ids=(), tree=config)
        assert run.tokens == reference
