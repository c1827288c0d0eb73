"""GPU-only checks (marker ``gpu``; skipped without CUDA): graph decoding equals eager decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models.graphed_vision import GraphedVisionEncoder
from common.models.loader import load_vlm
from common.speculative import ModelDrafter, autoregressive_generate, speculative_generate
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)

pytestmark = pytest.mark.gpu
QUESTION = "What are the key elements in this scene?"


def _visual(vlm):
    frames = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    return vlm.encode_pixels(vlm.preprocess(list(frames[:5]) if vlm.name == "eventgpt" else frames))


def _fp32_pair(models_dir):
    """(Video-LLaVA target, EventGPT draft): the tiny fp32 pair on the GPU."""
    return (load_vlm("videollava", models_dir / "videollava", quant="fp32", device="cuda"),
            load_vlm("eventgpt", models_dir / "eventgpt", quant="fp32", device="cuda"))


def _drafter(draft, draft_visual, target) -> ModelDrafter:
    """The plain EventGPT drafter for ``target``, prefilled on the question."""
    return ModelDrafter(draft, draft.prefill(draft_visual, QUESTION), vocab_limit=target.base_vocab_size,
                        target_vocab_size=target.vocab_size)


@pytest.mark.parametrize("compile_step", [False, True])
def test_cuda_graph_decoding_matches_eager(tiny_models_dir, compile_step):
    vlm = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cuda")
    with torch.no_grad():
        visual = _visual(vlm)
        eager = autoregressive_generate(vlm, vlm.prefill(visual, QUESTION), max_new_tokens=20)
        vlm.enable_cuda_graphs(512, step_sizes=(1, 4), compile=compile_step)
        graphed = autoregressive_generate(vlm, vlm.prefill(visual, QUESTION), max_new_tokens=20)
        assert graphed.tokens == eager.tokens
        state = vlm.prefill(visual, QUESTION)
        logits_graph = vlm.forward(state, [5, 6, 7], hidden_layers=[-1])  # padded into the 4-token graph
        hidden_graph = state.hidden[-1]
        vlm.disable_cuda_graphs()
        state = vlm.prefill(visual, QUESTION)
        logits_eager = vlm.forward(state, [5, 6, 7], hidden_layers=[-1])
        assert torch.allclose(logits_graph, logits_eager, atol=1e-3)
        assert torch.allclose(hidden_graph, state.hidden[-1], atol=1e-3)


def test_speculative_with_graphs_is_lossless(tiny_models_dir):
    target, draft = _fp32_pair(tiny_models_dir)
    with torch.no_grad():
        tv, dv = _visual(target), _visual(draft)
        plain = autoregressive_generate(target, target.prefill(tv, QUESTION), max_new_tokens=24)
        for m in (target, draft):
            m.enable_cuda_graphs(512, step_sizes=(1, 4))
        drafter = _drafter(draft, dv, target)
        spec = speculative_generate(target, target.prefill(tv, QUESTION), drafter, max_new_tokens=24, gamma=3)
        assert spec.tokens == plain.tokens


def test_batched_greedy_graph_matches_eager(tiny_models_dir):
    """The CUDA-graph batched decode gives the eager batched decode's answers and states, graph reused."""
    from common.models.greedy_batch import BatchedGreedyDecoder

    vlm = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cuda")
    questions = ["How many cars?", QUESTION, "Is anything moving to the left of the truck?"]
    with torch.no_grad():
        visual = _visual(vlm)
        prompts = [vlm.prompt_embeds(visual, q) for q in questions]
        eager = BatchedGreedyDecoder(vlm.runner, use_cuda_graph=False).generate(prompts, 16, vlm.eos_token_id, [-1, 1])
        graphed = BatchedGreedyDecoder(vlm.runner)
        for _ in range(2):  # the second call replays the kept graph
            out = graphed.generate(prompts, 16, vlm.eos_token_id, [-1, 1])
            assert out.answers == eager.answers
            for layer in (-1, 1):
                for a, b in zip(out.hidden[layer], eager.hidden[layer]):
                    assert torch.allclose(a, b, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphs_on_a_second_gpu(tiny_models_dir):
    """Graphs of a model on cuda:1 capture and replay while cuda:0 is the current device."""
    from common.models.greedy_batch import BatchedGreedyDecoder

    torch.cuda.set_device(0)
    vlm = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cuda:1")
    with torch.no_grad():
        visual = _visual(vlm)
        eager = autoregressive_generate(vlm, vlm.prefill(visual, QUESTION), max_new_tokens=12)
        prompts = [vlm.prompt_embeds(visual, QUESTION)] * 2
        batched = BatchedGreedyDecoder(vlm.runner).generate(prompts, 12, vlm.eos_token_id)
        vlm.enable_cuda_graphs(512, step_sizes=(1, 4))
        graphed = autoregressive_generate(vlm, vlm.prefill(visual, QUESTION), max_new_tokens=12)
    assert graphed.tokens == eager.tokens
    assert batched.answers == [eager.tokens] * 2


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_graphed_vision_encode_matches_eager(tiny_models_dir, kind):
    """enable_vision_graphs gives the eager visual embeddings, for each new input."""
    vlm = load_vlm(kind, tiny_models_dir / kind, quant="fp32", device="cuda")
    frames = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = vlm.preprocess(list(frames[:5]) if kind == "eventgpt" else frames)
        eager = vlm.encode_pixels(pixels).embeds
        vlm.enable_vision_graphs()
        first, second = vlm.encode_pixels(pixels).embeds, vlm.encode_pixels(pixels * 0.5).embeds
        assert isinstance(vlm.vision_graphs, GraphedVisionEncoder)
        assert torch.allclose(first, eager, atol=1e-5)
        assert not torch.allclose(second, first)  # replays read the new input
        vlm.disable_cuda_graphs()
        assert torch.allclose(vlm.encode_pixels(pixels * 0.5).embeds, second, atol=1e-5)


def test_parallel_run_captures_vision_graphs_while_the_other_model_runs(tiny_models_dir, tiny_dataset):  # noqa: F811
    """First concurrent run: one thread captures its vision graph while the other launches kernels."""
    from common.data import ClipDataset
    from common.drafters import DrafterFactory
    from common.parallel import run_parallel
    from common.pipeline import configure_decode, prefill_sample

    target, draft = _fp32_pair(tiny_models_dir)
    sample = ClipDataset(tiny_dataset)[0]
    with torch.no_grad():
        plain = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=16)
        assert configure_decode((draft, target), "cuda_graph", max_length=1024, gamma=3) == "cuda_graph"
        for _ in range(2):  # the first run captures both vision graphs concurrently, the second replays them
            out = run_parallel(draft, target, sample, DrafterFactory("eventgpt"), max_new_tokens=16, gamma=3)
            assert out.result.tokens == plain.tokens


def test_fused_kernel_decoding_matches_eager(tiny_models_dir):
    """The Triton-kernel graph step gives the eager greedy tokens and logits (fp32), and stays lossless."""
    target, draft = _fp32_pair(tiny_models_dir)
    with torch.no_grad():
        visual, dv = _visual(target), _visual(draft)
        eager = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=24)
        state = target.prefill(visual, QUESTION)
        logits_eager = target.forward(state, [5, 6, 7, 8, 9])
        for m in (target, draft):
            m.enable_cuda_graphs(512, step_sizes=(1, 6), kernels=True)
            assert m.runner.kernels_on
        fused = autoregressive_generate(target, target.prefill(visual, QUESTION), max_new_tokens=24)
        assert fused.tokens == eager.tokens
        state = target.prefill(visual, QUESTION)
        torch.testing.assert_close(target.forward(state, [5, 6, 7, 8, 9]), logits_eager, atol=1e-3, rtol=1e-3)
        drafter = _drafter(draft, dv, target)
        spec = speculative_generate(target, target.prefill(visual, QUESTION), drafter, max_new_tokens=24, gamma=5)
        assert spec.tokens == eager.tokens
        target.disable_cuda_graphs()
        assert not target.runner.kernels_on


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fused_kernels_in_bf16_at_7b_head_shapes():
    """bf16 split-K attention over a 4096-slot cache (32 heads x 128) and the bf16 fused step vs fp64/eager."""
    from common.models import kernels

    torch.manual_seed(0)
    q = torch.randn(6, 32, 128, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(32, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for rows in (1, 6):
        positions = torch.arange(2100, 2100 + rows, device="cuda")
        out = kernels.decode_attention(q[:rows], keys, values, positions, 128 ** -0.5)
        mask = torch.arange(4096, device="cuda")[None] <= positions[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:rows].double().transpose(0, 1), keys.double(), values.double(), attn_mask=mask)
        assert _rel(out, ref.transpose(0, 1).reshape(rows, -1)) < 1e-2
    from tests.test_kernels import _runner

    runner = _runner()
    runner.language_model.to(torch.bfloat16), runner.lm_head.to(torch.bfloat16)
    with torch.no_grad():
        cache = runner.new_cache(600, torch.bfloat16, torch.device("cuda"))
        runner.run(torch.randn(1, 500, 64, device="cuda", dtype=torch.bfloat16), cache)
        embeds, positions = torch.randn(1, 6, 64, device="cuda", dtype=torch.bfloat16), torch.arange(500, 506,
                                                                                                       device="cuda")
        eager_logits, _ = runner.static_step(embeds, positions, cache.clone())
        assert runner.use_kernels(True)
        fused_logits, _ = runner.static_step(embeds, positions, cache.clone())
    assert _rel(fused_logits, eager_logits) < 2e-2


def test_triton_prefill_and_nf4_kernel_in_bf16():
    """bf16 on the GPU (the interpreter cannot): Triton prefill (with a masked prefix) vs eager; nf4 kernel vs dequant."""
    from tests.test_kernels import _nf4_layer, _runner

    for masked_prefix in (0, 300):
        runner = _runner(masked_prefix=masked_prefix)
        runner.language_model.to(torch.bfloat16), runner.lm_head.to(torch.bfloat16)
        prompt = torch.randn(1, 500, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            eager = runner.run(prompt, runner.new_cache(600, torch.bfloat16, torch.device("cuda")))[0]
            assert runner.use_prefill_kernels(True)
            fused = runner.run(prompt, runner.new_cache(600, torch.bfloat16, torch.device("cuda")))[0]
        assert _rel(fused, eager) < 2e-2
    import bitsandbytes as bnb

    from common.models import nf4_kernels

    layer = _nf4_layer(torch.randn(4096, 4096) * 0.02, nested=True)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for rows in (1, 6):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        out = nf4_kernels.nf4_linear(x, nf4_kernels.nf4_weight(layer))
        assert out.dtype == torch.bfloat16 and _rel(out, x.float() @ dense.T) < 2e-2


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])  # Video-LLaVA-7B's nf4 shapes
def test_nf4_tc_kernel_in_bf16_at_7b_shapes(n, k):
    """The tensor-core nf4 kernel, every candidate tile, 1/6/16 rows: equals x @ bitsandbytes' dequantized weight."""
    import bitsandbytes as bnb

    from common.models import nf4_kernels as nk
    from tests.test_kernels import _nf4_layer

    torch.manual_seed(0)
    layer = _nf4_layer(torch.randn(n, k) * 0.02, nested=True)
    weight = nk.nf4_weight(layer)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # fp32 compute: fp32
    for rows in (1, 6, 16):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dense.to(torch.bfloat16).float().T  # each weight rounded to bf16, as the kernel does
        for cfg in (nk.TC_DEFAULT, *nk.TC_CANDIDATES):
            out = nk.nf4_linear_tc(x, weight, cfg)
            assert out.dtype == torch.bfloat16 and _rel(out, ref) < 5e-3, (rows, str(cfg))
        assert _rel(nk.nf4_linear(x, weight), ref) < 5e-3  # the first kernel, same contract
