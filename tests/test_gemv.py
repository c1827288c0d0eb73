"""The Triton GEMV equals F.linear (fp32 on the CPU interpreter; bf16 within tolerance on the GPU).

On the CPU this runs only under Triton's interpreter: ``TRITON_INTERPRET=1 python -m pytest tests/test_gemv.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 from the start", allow_module_level=True)
pytest.importorskip("triton")

from common.models import gemv as gemv_mod  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows", [1, 2, 6])
@pytest.mark.parametrize("n,k", [(40, 300), (64, 512), (17, 96)])  # ragged N and K tails, K under one tile
def test_gemv_equals_linear_fp32_for_every_config(rows, n, k):
    torch.manual_seed(rows * n + k)
    w = torch.randn(n, k, device=DEVICE)
    x = torch.randn(rows, k, device=DEVICE)
    ref = F.linear(x, w)
    for cfg in gemv_mod.CONFIGS:
        torch.testing.assert_close(gemv_mod.gemv(x, w, cfg), ref, atol=1e-4, rtol=1e-5)
    out = gemv_mod.gemv(x[None], w)  # leading dims kept, default tile
    assert out.shape == (1, rows, n)
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-5)


def test_gemv_reads_a_strided_input_and_a_weight_view():
    torch.manual_seed(1)
    big = torch.randn(96, 200, device=DEVICE)
    w = big[10:60]  # rows of a fused weight: a view with the parent's row stride
    x = torch.randn(6, 400, device=DEVICE)[:, ::2]  # non-unit column stride: copied
    torch.testing.assert_close(gemv_mod.gemv(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_gemv_is_deterministic_and_rejects_bad_shapes():
    torch.manual_seed(2)
    w, x = torch.randn(33, 700, device=DEVICE), torch.randn(3, 700, device=DEVICE)
    cfg = gemv_mod.CONFIGS[0]
    assert torch.equal(gemv_mod.gemv(x, w, cfg), gemv_mod.gemv(x, w, cfg))
    with pytest.raises(ValueError, match="rows"):
        gemv_mod.gemv(torch.randn(17, 700, device=DEVICE), w)
    with pytest.raises(ValueError, match="columns"):
        gemv_mod.gemv(x, w.T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 6])
def test_gemv_bf16_close_to_linear_on_gpu(rows):
    torch.manual_seed(3)
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, 11008, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    for cfg in gemv_mod.CONFIGS:
        out = gemv_mod.gemv(x, w, cfg).float()
        assert (out - ref).abs().max() / ref.abs().max() < 1e-2, cfg


@pytest.mark.parametrize("k", [1, 6])
def test_fused_step_with_triton_gemv_equals_eager_step(k):
    """``gemv="triton"``: the fused step's linears through the Triton GEMV give the eager step's logits (fp32)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    from common.models.decoder import LlamaRunner

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    runner = LlamaRunner(LlamaModel(cfg).eval().to(DEVICE), torch.nn.Linear(64, 100, bias=False).to(DEVICE),
                         gemv="triton")
    with torch.no_grad():
        cache = runner.new_cache(64, torch.float32, DEVICE)
        runner.run(torch.randn(1, 20, 64, device=DEVICE), cache)
        embeds, positions = torch.randn(1, k, 64, device=DEVICE), torch.arange(20, 20 + k, device=DEVICE)
        logits, _ = runner.static_step(embeds, positions, cache.clone())
        assert runner.use_kernels(True) and runner.use_gemv("triton")
        fused, _ = runner.static_step(embeds, positions, cache.clone())
        assert not runner.use_gemv("cublas")
        cublas, _ = runner.static_step(embeds, positions, cache.clone())
    torch.testing.assert_close(fused, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, cublas, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'cublas' or 'triton'"):
        runner.use_gemv("cutlass")


def test_gemv_profile_runs_at_tiny_shapes_on_the_cpu(tmp_path):
    """The GPU script's gemv section end to end (wall clock on the CPU): values, not only keys."""
    import json

    from benchmark_inference import gemv_profile

    out = tmp_path / "gemv.json"
    gemv_profile.main(["--json", str(out), "--device", "cpu", "--sections", "gemv", "--layers", "1",
                       "--hidden", "32", "--intermediate", "48", "--heads", "2", "--vocab", "40",
                       "--rows", "1,2", "--repeats", "1"])
    report = json.loads(out.read_text())["gemv"]
    assert report["down_32x48_rows_2"]["triton_rel_err"] < 1e-5
    assert set(report["qkv_96x32_rows_1"]["triton_per_config_ms"]) == {
        f"n{c.block_n}_k{c.block_k}_w{c.warps}_p{c.programs_per_sm}" for c in gemv_mod.CONFIGS}
    # 1 layer of qkv, o, gate_up, down + the LM head, fp32
    assert report["gemv_floor"]["gigabytes"] == pytest.approx(4 * (96 * 32 + 32 * 32 + 96 * 32 + 32 * 48 + 40 * 32) / 1e9)
    assert report["gemv_floor"]["triton_rows_2_ms"] > 0
    with pytest.raises(SystemExit, match="unknown"):
        gemv_profile.main(["--json", str(out), "--sections", "gemv,bogus"])


def test_gemv_profile_nf4_floor_tunes_the_tc_table_on_the_cpu(tmp_path):
    """The nf4 kernels-alone section: bytes of the step's nf4 weights, per-shape timings, the tuned table."""
    import json

    pytest.importorskip("bitsandbytes")
    from benchmark_inference import gemv_profile
    from common.models import nf4_kernels as nk

    out = tmp_path / "nf4.json"
    saved = dict(nk.TC_TABLE)
    try:
        gemv_profile.main(["--json", str(out), "--device", "cpu", "--sections", "nf4_floor", "--layers", "1",
                           "--hidden", "64", "--intermediate", "128", "--rows", "1,2", "--repeats", "1"])
        tuned = dict(nk.TC_TABLE)
    finally:
        nk.TC_TABLE.clear()
        nk.TC_TABLE.update(saved)
    report = json.loads(out.read_text())["nf4_floor"]
    elements = 4 * 64 * 64 + 2 * 128 * 64 + 64 * 128  # q, k, v, o, gate, up, down of one layer
    assert report["matmuls"] == 7 and report["gigabytes"] == pytest.approx((elements // 2 + elements // 64) / 1e9)
    assert set(tuned) - set(saved) == {(8, 64, 64), (8, 128, 64), (8, 64, 128)}  # tuned at 2 rows; 1 row stays on bnb
    assert report["tc_table"]["8,128,64"] == repr(nk.TC_CANDIDATES[0])
    assert report["128x64_rows_2"]["best_tc"] == str(nk.TC_CANDIDATES[0])
    assert report["128x64_rows_2"][f"tc:{nk.TC_CANDIDATES[0]}"]["ms"] > 0
    assert report["128x64_rows_2"]["best_tc_rel_err"] < 1e-6  # fp32 on the CPU
    assert report["128x64_rows_1"]["best_tc"] is None and "bnb" in report["128x64_rows_1"]
    assert report["summary"]["bnb_rows_2_over_bnb_rows_1"] == pytest.approx(
        report["bnb_rows_2_ms"] / report["bnb_rows_1_ms"])
    assert report["nf4_triton_tc_tuned_rows_2_gbps"] == pytest.approx(
        report["gigabytes"] / report["nf4_triton_tc_tuned_rows_2_ms"] * 1e3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 6])
def test_fused_step_triton_gemv_close_to_cublas_in_bf16_on_gpu(k):
    """bf16, a graphed fused step: ``gemv="triton"`` logits within bf16 tolerance of ``"cublas"``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    from common.models.decoder import CudaGraphDecoder, LlamaRunner

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                      num_attention_heads=8, max_position_embeddings=512)
    model = LlamaModel(cfg).eval().to("cuda", torch.bfloat16)
    runner = LlamaRunner(model, torch.nn.Linear(512, 1000, bias=False).to("cuda", torch.bfloat16))
    assert runner.use_kernels(True)
    outs = {}
    with torch.no_grad():
        embeds = torch.randn(k, 512, device="cuda", dtype=torch.bfloat16)
        for kind in ("cublas", "triton"):
            runner.use_gemv(kind)
            cache = runner.new_cache(128, torch.bfloat16, torch.device("cuda"))
            runner.run(torch.full((1, 20, 512), 0.1, device="cuda", dtype=torch.bfloat16), cache)
            outs[kind] = CudaGraphDecoder(runner, cache, [k]).step(embeds)
    err = (outs["triton"] - outs["cublas"]).abs().max() / outs["cublas"].abs().max()
    assert err < 2e-2
