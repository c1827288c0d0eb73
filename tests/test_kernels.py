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


@pytest.mark.parametrize("hidden,kv_heads", [(64, 2), (96, 4)])
@pytest.mark.parametrize("masked_prefix", [0, 20, 50])  # none, inside the prompt, longer than the prompt
def test_kernel_prefill_equals_eager_prefill(hidden, kv_heads, masked_prefix):
    """A fresh prompt through the Triton prefill: same logits, hidden states and cache; decoding after it agrees."""
    runner = _runner(hidden=hidden, kv_heads=kv_heads, masked_prefix=masked_prefix)
    prompt, step = torch.randn(1, 40, hidden, device=DEVICE), torch.randn(1, 6, hidden, device=DEVICE)
    with torch.no_grad():
        eager_cache, kernel_cache = runner.new_cache(60, torch.float32, DEVICE), runner.new_cache(60, torch.float32, DEVICE)
        logits, hidden_states = runner.run(prompt, eager_cache, hidden_layers=(0, 1, -1))
        assert runner.use_prefill_kernels(True)
        kernel_logits, kernel_hidden = runner.run(prompt, kernel_cache, hidden_layers=(0, 1, -1))
        after, kernel_after = runner.run(step, eager_cache)[0], runner.run(step, kernel_cache)[0]
    torch.testing.assert_close(kernel_logits, logits, atol=1e-5, rtol=1e-5)
    for layer in (0, 1, -1):
        torch.testing.assert_close(kernel_hidden[layer], hidden_states[layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_cache.keys, eager_cache.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_cache.values, eager_cache.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_after, after, atol=1e-5, rtol=1e-5)
    assert not runner.use_prefill_kernels(False)


def _nf4_layer(weight: torch.Tensor, nested: bool):
    bnb = pytest.importorskip("bitsandbytes")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=nested,
                                     quant_type="nf4")
    return layer.to(DEVICE)


@pytest.mark.parametrize("nested", [False, True])  # double-quantized absmax (the project's 4-bit config) or not
@pytest.mark.parametrize("rows", [1, 6, 16])
def test_nf4_linear_equals_the_dequantized_weight(nested, rows):
    """Every tile config; 5 quantization blocks a row, so tiles of 2 and 4 blocks end part-filled."""
    import bitsandbytes as bnb

    from common.models import nf4_kernels

    torch.manual_seed(0)
    layer = _nf4_layer(torch.randn(96, 320) * 0.05, nested)
    weight = nf4_kernels.nf4_weight(layer)
    assert weight is not None and weight.out_features == 96 and weight.in_features == 320
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(rows, 320, device=DEVICE)
    for config in nf4_kernels.CONFIGS[:4]:
        torch.testing.assert_close(nf4_kernels.nf4_linear(x, weight, config), x @ dense.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nf4_kernels.nf4_linear(x[None], weight)[0], x @ dense.T, atol=1e-5, rtol=1e-5)
    assert nf4_kernels.nf4_weight(torch.nn.Linear(4, 4, bias=False)) is None
    with pytest.raises(ValueError, match="up to 16 rows"):
        nf4_kernels.nf4_linear(torch.randn(17, 320, device=DEVICE), weight)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("rows", [1, 6, 16])
def test_nf4_linear_tc_equals_the_dequantized_weight(nested, rows):
    """The tensor-core kernel: every code lookup, both operand orders, 1-3 K splits summed by a second kernel or
    serially, part-filled tiles, odd N."""
    import bitsandbytes as bnb

    from common.models import nf4_kernels as nk

    torch.manual_seed(rows)
    configs = (nk.Nf4TcConfig(serial=True), nk.Nf4TcConfig(lut=1, w_left=False, programs_per_sm=0),
               nk.Nf4TcConfig(32, 4, programs_per_sm=4, lut=3), nk.Nf4TcConfig(128, 2, lut=2, w_left=False))
    for (n, k), cfgs in (((96, 320), configs), ((77, 192), configs[:2])):  # 5 and 3 quantization blocks a row
        layer = _nf4_layer(torch.randn(n, k) * 0.05, nested)
        weight = nk.nf4_weight(layer)
        dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        x = torch.randn(rows, k, device=DEVICE)
        for config in cfgs:
            torch.testing.assert_close(nk.nf4_linear_tc(x, weight, config), x @ dense.T, atol=1e-5, rtol=1e-5)
        assert not weight.locks.any()  # the serial reduction's counters are reset after each call
    torch.testing.assert_close(nk.nf4_linear_tc(x[None], weight)[0], x @ dense.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="up to 16 rows"):
        nk.nf4_linear_tc(torch.randn(17, k, device=DEVICE), weight)
    big = nk.Nf4Weight(**{**vars(weight), "blocksize": 512})  # past TC_MAX_BLOCKSIZE: the first kernel's job
    with pytest.raises(ValueError, match="^nf4_linear takes up to 16 rows of 192"):
        nk.nf4_linear_tc(torch.randn(17, k, device=DEVICE), big)


def test_nf4_tc_config_table():
    """The fixed table: rows classes 8 and 16 per shape, the default elsewhere; set_tc_configs adds entries."""
    from common.models import nf4_kernels as nk

    weight = nk.Nf4Weight(packed=torch.empty(0), absmax=torch.empty(0), code=torch.empty(16), out_features=96,
                          in_features=320, blocksize=64)
    saved = dict(nk.TC_TABLE)
    try:
        nk.set_tc_configs({(8, 96, 320): nk.Nf4TcConfig(32, 4)})
        assert nk.tc_config(6, weight) == nk.Nf4TcConfig(32, 4) and nk.tc_config(1, weight).block_n == 32
        assert nk.tc_config(9, weight) == nk.TC_DEFAULT
        assert str(nk.Nf4TcConfig(32, 4)) == "n32_sub4_w4_s1_p8_lut0_wl"
        assert str(nk.Nf4TcConfig(serial=True)).endswith("_wl_serial")
    finally:
        nk.TC_TABLE.clear()
        nk.TC_TABLE.update(saved)


def _quantize_runner(runner: LlamaRunner) -> LlamaRunner:
    """The runner's decoder with every projection an nf4 ``Linear4bit`` (double-quantized absmax)."""
    for layer in runner.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, _nf4_layer(getattr(parent, name).weight, nested=True))
    return LlamaRunner(runner.language_model, runner.lm_head, masked_prefix=runner.masked_prefix)


@pytest.mark.parametrize("mode", ["triton", "triton_tc"])
def test_nf4_kernel_verify_step_equals_bitsandbytes(mode):
    """A 4-bit decoder: 6-row eager and Triton steps through an nf4 kernel equal bitsandbytes' own matmuls."""
    runner = _quantize_runner(_runner(hidden=64, kv_heads=2))
    prompt, step = torch.randn(1, 30, 64, device=DEVICE), torch.randn(1, 6, 64, device=DEVICE)
    with torch.no_grad():
        cache = runner.new_cache(80, torch.float32, DEVICE)
        runner.run(prompt, cache)
        eager_cache, nf4_cache, fused_cache = cache.clone(), cache.clone(), cache.clone()
        logits = runner.run(step, eager_cache)[0]
        assert runner.use_nf4_kernel(True, mode=mode)
        nf4_logits = runner.run(step, nf4_cache)[0]
        positions = torch.arange(30, 36, device=DEVICE)
        static_logits, _ = runner.static_step(step, positions, cache.clone())
        assert runner.use_kernels(True)  # quantized projections: q/k/v and gate/up concatenated per step
        fused_logits, _ = runner.static_step(step, positions, fused_cache)
    torch.testing.assert_close(nf4_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_logits, static_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_logits, logits, atol=1e-4, rtol=1e-4)
    assert not runner.use_nf4_kernel(False)


@pytest.mark.parametrize("gemv", ["cublas", "triton"])
def test_nf4_dequant_mode_verify_step_equals_bitsandbytes(gemv):
    """Multi-row nf4 steps dequantized into one scratch matrix (then cuBLAS or the Triton GEMV) equal bitsandbytes."""
    runner = _quantize_runner(_runner(hidden=64, kv_heads=2))
    prompt, step = torch.randn(1, 30, 64, device=DEVICE), torch.randn(1, 6, 64, device=DEVICE)
    with torch.no_grad():
        cache = runner.new_cache(80, torch.float32, DEVICE)
        runner.run(prompt, cache)
        logits = runner.run(step, cache.clone())[0]
        assert runner.use_nf4_kernel(True, mode="dequant")
        dequant_logits = runner.run(step, cache.clone())[0]
        assert runner.use_kernels(True)
        runner.use_gemv(gemv)
        fused_logits, _ = runner.static_step(step, torch.arange(30, 36, device=DEVICE), cache.clone())
    torch.testing.assert_close(dequant_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused_logits, logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one of 'triton', 'triton_tc', 'dequant'"):
        runner.use_nf4_kernel(True, mode="bf16")
