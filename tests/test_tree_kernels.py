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


@pytest.mark.parametrize("start,masked_prefix", [(121, 0), (121, 40), (60, 0)])  # the region crosses a block
def test_tree_attention_equals_per_row_path_attention(start, masked_prefix):
    """Row r attends the cache below ``start`` and then exactly its pending rows and ancestors, in order."""
    positions, rows = _tree(start)
    k = len(PARENTS) + 1
    keys, values = _cache()
    q = torch.randn(k, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = kernels.decode_attention(q, keys, values, positions, HEAD_DIM ** -0.5, masked_prefix=masked_prefix,
                                   tree_slots=rows + start)
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


def test_tree_row_equals_the_causal_step_at_its_position_bitwise():
    """Each tree row's output is the causal kernel's at its virtual position over a cache holding its path."""
    keys, values = _cache()
    start = 121
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
