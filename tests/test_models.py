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
