"""Both tiny checkpoints load through the real loaders; the KV cache path equals a full forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.models.errors import ModelLoadError
from common.models.eventgpt import EventGPTForCausalLM
from common.models.loader import load_vlm

QUESTION = "What are the key elements in this scene?"
TOL = {"fp32": 1e-4, "bf16": 0.15, "4bit": 1e-3}


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)


def _visual(vlm):
    frames = _frames(5 if vlm.name == "eventgpt" else 8)
    return vlm.encode_pixels(vlm.preprocess(list(frames) if vlm.name == "eventgpt" else frames))


@pytest.fixture(scope="module", params=["fp32", "bf16", "4bit"])
def pair(request, tiny_models_dir):
    quant = request.param
    return quant, {kind: load_vlm(kind, tiny_models_dir / kind, quant=quant, device="cpu")
                   for kind in ("eventgpt", "videollava")}


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_incremental_forward_equals_one_full_forward(pair, kind):
    quant, models = pair
    vlm = models[kind]
    visual = _visual(vlm)
    tokens = [5, 17, 42, 7, 99]
    state = vlm.prefill(visual, QUESTION)
    first = state.logits.clone()
    stepwise = [vlm.forward(state, [t])[0] for t in tokens]
    # one pass over prompt + tokens, no cache reuse
    embeds = torch.cat([vlm.prompt_embeds(visual, QUESTION), vlm.embed_tokens(torch.tensor(tokens))])
    full, _ = vlm.runner.run(embeds, vlm.runner.new_cache(embeds.shape[0], vlm.dtype, vlm.device))
    n = len(tokens)
    reference = full[-n - 1:]
    got = torch.stack([first, *stepwise])
    scale = reference.abs().max().clamp_min(1.0)
    assert ((got - reference).abs().max() / scale).item() < TOL[quant]


def test_runner_matches_transformers_forward(pair):
    """Our KV-cached runner reproduces transformers' own Video-LLaVA forward."""
    quant, models = pair
    if quant != "fp32":
        pytest.skip("compared in fp32")
    vlm = models["videollava"]
    frames = _frames(8)
    pixels = vlm.preprocess(frames)
    visual = vlm.encode_pixels(pixels)
    state = vlm.prefill(visual, QUESTION)
    ours = vlm.forward(state, [11, 12, 13])
    ids = vlm.prompt_ids(QUESTION, visual.num_tokens) + [11, 12, 13]
    with torch.no_grad():
        theirs = vlm.model(input_ids=torch.tensor([ids]), pixel_values_videos=pixels).logits[0, -3:].float()
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_truncate_then_reforward_equals_fresh_run(pair, kind):
    quant, models = pair
    vlm = models[kind]
    visual = _visual(vlm)
    state = vlm.prefill(visual, QUESTION)
    vlm.forward(state, [5, 6, 7, 8, 9])
    vlm.truncate(state, state.prompt_length + 2)
    again = vlm.forward(state, [30, 31])
    fresh_state = vlm.prefill(visual, QUESTION)
    fresh = vlm.forward(fresh_state, [5, 6, 30, 31])[-2:]
    assert state.length == fresh_state.length
    assert torch.allclose(again, fresh, atol=1e-4 if quant == "fp32" else 5e-2)


def test_hidden_states_of_chosen_layers(pair):
    quant, models = pair
    vlm = models["eventgpt"]
    state = vlm.prefill(_visual(vlm), QUESTION, hidden_layers=[-1, -2])
    assert set(state.hidden) == {-1, -2}
    assert state.hidden[-1].shape == (state.prompt_length, vlm.hidden_size)
    vlm.forward(state, [4, 5], hidden_layers=[-1])
    logits_from_hidden = vlm.lm_head(state.hidden[-1]).float()
    assert torch.allclose(logits_from_hidden[-1], state.logits, atol=1e-3)


def test_event_tokens_are_frames_plus_patches(pair):
    _, models = pair
    vlm = models["eventgpt"]
    tower = vlm.model.model.visual_tower.visual_tower.config
    patches = (tower.image_size // tower.patch_size) ** 2
    assert _visual(vlm).num_tokens == 5 + patches + 1


def test_event_pooling_at_full_size_gives_582_tokens():
    """5 frames of 577 CLIP tokens (336 px, patch 14, CLS kept) pool to 5 + 577 = 582."""
    feats = torch.randn(5, 577, 8)
    pooled = torch.cat([feats.mean(dim=1), feats.mean(dim=0)])
    assert pooled.shape[0] == 582
    assert EventGPTForCausalLM.encode_events.__doc__ and "spatial mean" in EventGPTForCausalLM.encode_events.__doc__


def test_shared_base_vocabulary(pair):
    _, models = pair
    e, v = models["eventgpt"], models["videollava"]
    assert e.base_vocab_size == v.base_vocab_size
    assert e.tokenizer.convert_ids_to_tokens(list(range(50))) == v.tokenizer.convert_ids_to_tokens(list(range(50)))
    assert v.vocab_size % 64 == 0 and v.vocab_size > v.base_vocab_size
    assert e.tokenizer.convert_tokens_to_ids("<ev_patch>") >= e.base_vocab_size


def test_missing_key_names_the_checkpoint(tiny_models_dir, tmp_path):
    broken = tmp_path / "eventgpt_missing"
    shutil.copytree(tiny_models_dir / "eventgpt", broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.feature_adaptor.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"eventgpt_missing.*feature_adaptor"):
        load_vlm("eventgpt", broken, quant="fp32", device="cpu")


def test_wrong_folder_and_wrong_model_type(tiny_models_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"no_such_folder.*--eventgpt_path"):
        load_vlm("eventgpt", tmp_path / "no_such_folder", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty.*config.json"):
        load_vlm("eventgpt", tmp_path / "empty", device="cpu")
    with pytest.raises(ModelLoadError, match=r"model_type is 'video_llava', expected 'EventChat_llama'"):
        load_vlm("eventgpt", tiny_models_dir / "videollava", device="cpu")
    with pytest.raises(ModelLoadError, match=r"expected 'video_llava'"):
        load_vlm("videollava", tiny_models_dir / "eventgpt", device="cpu")


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_batched_teacher_forcing_matches_cached_decoding(pair, kind):
    """Padded batch forward over prompt + answer == prefill + token-by-token forward (logits and states)."""
    quant, models = pair
    if quant != "fp32":
        pytest.skip("compared in fp32")
    vlm = models[kind]
    visual = _visual(vlm)
    questions, answers = ["How many cars?", QUESTION], [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        tf = vlm.teacher_forced([visual, visual], questions, answers, hidden_layers=[-1])
    for i, question in enumerate(questions):
        state = vlm.prefill(visual, question, hidden_layers=[-1])
        rows, states = [state.logits], [state.hidden[-1][-1]]
        for token in answers[i][:-1]:
            vlm.forward(state, [token], hidden_layers=[-1])
            rows.append(state.logits)
            states.append(state.hidden[-1][-1])
        assert torch.allclose(torch.stack(rows), tf.logits[i], atol=1e-4)
        assert torch.allclose(torch.stack(states), tf.hidden[-1][i], atol=1e-4)


def test_fused_projections_give_the_same_logits(tiny_models_dir):
    """Concatenated q/k/v and gate/up weights (the GPU fast path) change nothing but speed."""
    vlm = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cpu")
    visual = _visual(vlm)
    before = vlm.forward(vlm.prefill(visual, QUESTION), [5, 6, 7])
    assert vlm.runner.fuse_projections()
    after = vlm.forward(vlm.prefill(visual, QUESTION), [5, 6, 7])
    assert torch.allclose(before, after, atol=1e-5)
    q = vlm.runner.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == vlm.runner._fused[0][0].data_ptr()  # a view: no duplicated memory


@pytest.mark.parametrize("kind", ["eventgpt", "videollava"])
def test_batched_greedy_equals_one_at_a_time(tiny_models_dir, kind):
    """Left-padded batched decoding gives each sample exactly its own greedy answer."""
    from common.speculative import autoregressive_generate

    vlm = load_vlm(kind, tiny_models_dir / kind, quant="fp32", device="cpu")
    visual = _visual(vlm)
    questions = ["How many cars?", QUESTION, "Is anything moving to the left of the truck?"]
    with torch.no_grad():
        batched = vlm.generate_greedy_batch([visual] * 3, questions, max_new_tokens=12, hidden_layers=[-1, 0, 1])
        single = [autoregressive_generate(vlm, vlm.prefill(visual, q), max_new_tokens=12).tokens for q in questions]
        forced = vlm.teacher_forced([visual] * 3, questions, batched.answers, hidden_layers=[-1, 0, 1], logits=False)
    assert batched.answers == single
    # the states recorded while decoding are the states of the model teacher-forced on its own answer
    for layer in (-1, 0, 1):
        for got, want, answer in zip(batched.hidden[layer], forced.hidden[layer], single):
            assert got.shape == (len(answer), vlm.hidden_size)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def _packed_gemv_reference(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """bitsandbytes' packed CPU matmul, emulated where its AVX512-BF16 kernel is absent.

    The packed weight goes back through bnb's own inverse of the packing, then bnb's dequantizer;
    like the real kernel, it computes in bf16.
    """
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    assert state.packing_format_for_cpu, "the packed path was not taken"
    unpack_state = copy.copy(state)
    unpack_state.original_nested = False  # keep the bf16 absmax the kernel reads (no re-quantization)
    qweight, _ = _convert_weight_packed_for_cpu_inverse(B.data, unpack_state)
    absmax = state.absmax.T.reshape(-1).float()
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(qweight, absmax, state.blocksize, state.quant_type,
                                                           list(state.shape), torch.bfloat16)
    result = torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


@pytest.mark.parametrize("kind", ["videollava", "eventgpt"])
def test_4bit_packed_cpu_path_matches_unpacked(tiny_models_dir, monkeypatch, kind):
    """The AVX512-BF16 CPU path (weights re-packed in 64-wide blocks) runs on the tiny models and
    matches the unpacked 4-bit output, on any CPU: bnb's capability check is forced on; where the CPU
    lacks the packed kernel, its matmul is emulated from bnb's own unpacking."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.nn import Linear4bit

    tokens = [5, 17, 42]
    plain = load_vlm(kind, tiny_models_dir / kind, quant="4bit", device="cpu")
    visual = _visual(plain)
    with torch.no_grad():
        want = torch.cat([plain.prefill(visual, QUESTION).logits[None], plain.forward(plain.prefill(visual, QUESTION),
                                                                                     tokens)])
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in plain.model.modules() if isinstance(m, Linear4bit))
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    if not bnb_functional.has_avx512bf16():
        monkeypatch.setattr(bnb_functional, "gemv_4bit", _packed_gemv_reference)
    packed = load_vlm(kind, tiny_models_dir / kind, quant="4bit", device="cpu")
    with torch.no_grad():
        state = packed.prefill(visual, QUESTION)
        got = torch.cat([state.logits[None], packed.forward(state, tokens)])
    layers = [m for m in packed.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    scale = want.abs().max().clamp_min(1.0)
    assert ((got - want).abs().max() / scale).item() < 5e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.75


def test_tiny_sizes_pack_for_the_4bit_cpu_path():
    """Every width the 4-bit path quantizes in the random pair is packable by bnb's AVX512-BF16 CPU path."""
    from common.models.quant import cpu_4bit_packable
    from common.training import SHIPPED_SIZES
    from scripts.make_tiny_models import EVENTGPT_SIZE, VIDEOLLAVA_SIZE

    for size in (EVENTGPT_SIZE, VIDEOLLAVA_SIZE, *SHIPPED_SIZES.values()):
        h, i = size.hidden_size, size.intermediate_size
        assert cpu_4bit_packable(h, h) and cpu_4bit_packable(h, i) and cpu_4bit_packable(i, h), size
    assert not cpu_4bit_packable(96, 96)  # the old tiny Video-LLaVA width: 144 absmax blocks for 96 rows
