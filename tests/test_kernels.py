"""The Triton decode kernels equal the eager step (fp32), compiled on CUDA or interpreted on the CPU.

On the CPU these run only under Triton's interpreter, which must be on before anything imports
Triton: ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`` (skipped otherwise, and
without Triton). tests/test_gpu.py checks bf16 on the GPU; the interpreter cannot (its ``tl.dot``
on bf16 operands returns garbage: numpy has no bfloat16).
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

from common.models.decoder import LlamaRunner  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _runner(seed: int = 0, hidden: int = 64, kv_heads: int = 2, masked_prefix: int = 0) -> LlamaRunner:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return LlamaRunner(LlamaModel(cfg).eval().to(DEVICE), torch.nn.Linear(hidden, 100, bias=False).to(DEVICE),
                       masked_prefix=masked_prefix)


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("hidden,kv_heads", [(64, 2), (96, 4)])  # head size 16 with GQA; 24 (not a power of 2)
@pytest.mark.parametrize("masked_prefix", [0, 70])  # a widened twin's hidden visual padding
def test_fused_step_equals_eager_step(k, hidden, kv_heads, masked_prefix):
    """Logits, final state and the cache's new keys/values agree; a split boundary (128) is crossed."""
    runner = _runner(hidden=hidden, kv_heads=kv_heads, masked_prefix=masked_prefix)
    with torch.no_grad():
        cache = runner.new_cache(300, torch.float32, DEVICE)
        runner.run(torch.randn(1, 125, hidden, device=DEVICE), cache)
        embeds = torch.randn(1, k, hidden, device=DEVICE)
        positions = torch.arange(125, 125 + k, device=DEVICE)
        eager_cache, fused_cache = cache.clone(), cache.clone()
        logits, hidden = runner.static_step(embeds, positions, eager_cache)
        assert runner.use_kernels(True) and runner.kernels_on
        fused_logits, fused_hidden = runner.static_step(embeds, positions, fused_cache)
    assert fused_logits.shape == (k, 100)
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_hidden, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.keys, eager_cache.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.values, eager_cache.values, atol=1e-5, rtol=1e-5)
    assert fused_logits.argmax(-1).tolist() == logits.argmax(-1).tolist()


def test_use_kernels_off_restores_the_eager_ops():
    runner = _runner()
    assert runner.use_kernels(True)
    assert not runner.use_kernels(False) and not runner.kernels_on
