"""The decoder object of a model (``vlm.decoding``) and the batched passes split out of the model class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import batch_passes
from common.models.loader import load_vlm

QUESTION = "What are the key elements in this scene?"


@pytest.fixture(scope="module")
def vlm(tiny_models_dir):
    return load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cpu")


def _visual(vlm):
    frames = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    return vlm.encode_pixels(vlm.preprocess(frames))


def test_model_routes_decode_through_its_decoding_object(vlm):
    """``vlm.graphs`` / ``vlm.fixed_step`` are the decoding's; its public step is what ``forward`` runs."""
    assert vlm.graphs is None and vlm.decoding.graphs is None and vlm.fixed_step is None
    visual = _visual(vlm)
    state = vlm.prefill(visual, QUESTION)
    other = vlm.prefill(visual, QUESTION)
    want = vlm.forward(state, [5, 6, 7], hidden_layers=[-1, 1])
    got, hidden = vlm.decoding.step(other.cache, vlm.embed_tokens(torch.tensor([5, 6, 7])), [-1, 1])
    assert torch.equal(got, want)
    assert other.length == state.length == state.prompt_length + 3
    assert torch.equal(hidden[1], state.hidden[1]) and hidden[-1].shape == (3, vlm.hidden_size)


def test_graph_routing_refuses_a_cpu_model_and_an_uncaptured_fixed_step(vlm):
    with pytest.raises(ValueError, match="CUDA device"):
        vlm.enable_cuda_graphs(256, step_sizes=(1, 4), fixed_step=4)
    with pytest.raises(ValueError, match="fixed step 4 needs enable_cuda_graphs"):
        vlm.use_fixed_step(4)
    vlm.use_fixed_step(None)
    vlm.disable_cuda_graphs()
    assert vlm.fixed_step is None and vlm.graphs is None and not vlm.runner.kernels_on


def test_batch_pass_functions_equal_the_model_methods(vlm):
    visual = _visual(vlm)
    questions, answers = ["How many cars?", QUESTION], [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        method = vlm.teacher_forced([visual, visual], questions, answers, hidden_layers=[0, -1])
        function = batch_passes.teacher_forced(vlm, [visual, visual], questions, answers, hidden_layers=[0, -1])
        greedy = batch_passes.generate_greedy_batch(vlm, [visual] * 2, questions, max_new_tokens=6)
    assert method.spans == function.spans and len(method.spans) == 2
    assert [t.shape[0] for t in function.logits] == [4, 2]
    assert all(torch.equal(a, b) for a, b in zip(method.logits, function.logits))
    assert all(torch.equal(a, b) for a, b in zip(method.hidden[0], function.hidden[0]))
    assert greedy.answers == vlm.generate_greedy_batch([visual] * 2, questions, max_new_tokens=6).answers
    assert vlm.decoding.batched(vlm.device) is vlm.decoding.batched(vlm.device)  # made once
