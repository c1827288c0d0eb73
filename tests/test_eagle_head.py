"""EAGLE head: training on extracted target features, checkpoints without the target's weights, lossless drafting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from common.data import ClipDataset
from common.defaults import default_dataset_dir, default_model_path
from common.drafters.eagle_head import (
    EagleDrafter,
    EagleHead,
    EagleHeadConfig,
    EagleTarget,
    load_eagle_head,
    make_eagle_drafter,
    save_eagle_head,
)
from common.models.loader import load_vlm
from common.pipeline import prefill_sample
from common.speculative import autoregressive_generate, speculative_generate
from feature_alignment import extract_hidden_states as extract
from feature_alignment.train_eagle_head import main as train_main

MAX_NEW = 8




@pytest.fixture(scope="module")
def extracted(models, tmp_path_factory):
    from tests.data_fixtures import make_dataset

    data = tmp_path_factory.mktemp("eagle_ds")
    make_dataset(data, num_clips=4, split="train", seed=3)
    out = tmp_path_factory.mktemp("eagle_hidden") / "train"
    extract.main(["--dataset_dir", str(data), "--split", "train", "--output_dir", str(out), "--device", "cpu",
                  "--max_new_tokens", str(MAX_NEW), "--chunk_size", "4", "--batch_size", "4", "--layers=-1",
                  "--max_questions", "10"], models=models)
    return out


@pytest.fixture(scope="module")
def trained(extracted, tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle_head")
    result = train_main(["--train_dir", str(extracted), "--output_dir", str(out), "--epochs", "2", "--batch_size", "8",
                         "--lr", "3e-3", "--device", "cpu"])
    return out, result


def samples(n=2):
    return list(ClipDataset(default_dataset_dir()))[:n]


def test_training_reports_top1_and_saves_only_the_head(trained, models):
    out, result = trained
    assert len(result["history"]) == 2
    for row in result["history"]:
        assert 0.0 <= row["val_top1"] <= 1.0 and row["val_positions"] > 0 and row["train_positions"] > 0
    assert result["best"]["epoch"] in (1, 2)
    for name in ("RESULTS.md", "history.json", "results.json", "training_curves.png", "config.json"):
        assert (out / name).is_file()
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["feature_layer"] == -1 and config["hidden_size"] == models[1].hidden_size
    with safe_open(str(out / "best" / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k).numel() for k in f.keys()}
    assert stored and not any("lm_head" in k or "embed" in k for k in stored)
    head = load_eagle_head(out, models[1])  # a training folder resolves to best/
    # the checkpoint holds exactly the head's own parameters (the frozen LM head and embeddings stay out)
    assert sum(stored.values()) == head.num_parameters()
    assert head.bound and head.vocab_limit == models[1].base_vocab_size


def test_training_resumes_from_last(extracted, tmp_path):
    argv = ["--train_dir", str(extracted), "--output_dir", str(tmp_path), "--batch_size", "8", "--device", "cpu"]
    first = train_main(argv + ["--epochs", "1"])
    second = train_main(argv + ["--epochs", "2"])
    assert [r["epoch"] for r in first["history"]] == [1]
    assert [r["epoch"] for r in second["history"]] == [1, 2]


def test_trained_head_drafts_losslessly(trained, models):
    _, target = models
    head = load_eagle_head(trained[0], target)
    for sample in samples():
        reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=12).tokens
        proxy = EagleTarget(target, head.config.feature_layer)
        state = prefill_sample(proxy, sample).state
        drafter = make_eagle_drafter(head, None, proxy, state)
        result = speculative_generate(proxy, state, drafter, max_new_tokens=12, gamma=3)
        assert result.tokens == reference
        assert drafter.stats["steps"] > 0 and drafter.stats["tokens_proposed"] > 0


def test_recorded_features_are_the_extracted_rows(models):
    """The wrapper's features of a generation equal the teacher-forced rows the head is trained on."""
    _, target = models
    sample = samples(1)[0]
    torch.manual_seed(0)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target)
    proxy = EagleTarget(target, -1)
    state = prefill_sample(proxy, sample).state
    result = speculative_generate(proxy, state, EagleDrafter(head, proxy), max_new_tokens=10, gamma=3)
    visual = target.encode(sample)
    tf = target.teacher_forced([visual], [sample.question], [result.tokens], hidden_layers=[-1], logits=False)
    feats = proxy.features(state)
    rows = min(feats.shape[0], len(result.tokens))
    assert torch.allclose(feats[:rows], tf.hidden[-1][0][:rows], atol=1e-4)
    proxy.truncate(state, state.prompt_length + 2)
    assert proxy.features(state).shape[0] == 3


def test_random_head_is_lossless_for_any_gamma_and_checks_its_target(models, tmp_path):
    draft, target = models
    torch.manual_seed(1)
    head = EagleHead(EagleHeadConfig.for_target(target))
    save_eagle_head(head, tmp_path / "h")
    head = load_eagle_head(tmp_path / "h", target)
    sample = samples(1)[0]
    reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=10).tokens
    for gamma in (1, 4):
        proxy = EagleTarget(target, -1)
        state = prefill_sample(proxy, sample).state
        drafter = make_eagle_drafter(head, None, proxy, None)  # the wrapper's latest state
        assert speculative_generate(proxy, state, drafter, max_new_tokens=10, gamma=gamma).tokens == reference
    assert EagleDrafter(head, EagleTarget(target, -1)).propose([], 3).tokens == []  # no target prefill yet
    unbound = load_eagle_head(tmp_path / "h")  # e.g. loaded by a drafter factory before the target exists
    proxy = EagleTarget(target, -1)
    state = prefill_sample(proxy, sample).state
    assert speculative_generate(proxy, state, make_eagle_drafter(unbound, None, proxy, state), max_new_tokens=10,
                                gamma=3).tokens == reference
    assert unbound.bound
    with pytest.raises(TypeError, match="EagleTarget"):
        EagleDrafter(head, target)
    with pytest.raises(ValueError, match="hidden size"):
        load_eagle_head(tmp_path / "h", draft)


@pytest.mark.gpu
def test_cuda_graph_verification_with_features_is_lossless(tmp_path):
    """On CUDA: verify forwards through the feature-returning graphs match the target's own fixed-step decode."""
    target = load_vlm("videollava", default_model_path("videollava"), device="cuda", quant="bf16")
    target.enable_cuda_graphs(1024, step_sizes=(1, 4), fixed_step=4)
    head = EagleHead(EagleHeadConfig.for_target(target)).to("cuda", target.dtype).bind(target)
    for sample in samples():
        reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=20).tokens
        proxy = EagleTarget(target, -1)
        state = prefill_sample(proxy, sample).state
        result = speculative_generate(proxy, state, EagleDrafter(head, proxy, state), max_new_tokens=20, gamma=3)
        assert result.tokens == reference
        assert proxy.features(state).shape[0] >= len(result.tokens)


def test_feature_step_is_the_targets_own_graph_step(models):
    """The final-layer feature step computes exactly the target's static (graph) step, and returns its state."""
    from common.drafters.eagle_head import feature_step

    _, target = models
    runner = target.runner
    torch.manual_seed(0)
    embeds = torch.randn(1, 3, target.hidden_size)
    positions = torch.arange(3)
    caches = [runner.new_cache(8, torch.float32, torch.device("cpu")) for _ in range(2)]
    logits, state = runner.static_step(embeds, positions, caches[0])
    out = feature_step(runner, -1)(embeds, positions, caches[1])
    vocab = logits.shape[-1]
    assert torch.equal(out[:, :vocab], logits) and torch.equal(out[:, vocab:], state.float())
    assert torch.equal(caches[0].keys, caches[1].keys)
    middle = feature_step(runner, 1)(embeds, positions, caches[1])
    assert torch.equal(middle[:, :vocab], logits)  # stock kernels on the CPU: the same logits
    assert not torch.equal(middle[:, vocab:], out[:, vocab:])  # layer 1, not the final state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eagle_verify_matches_the_kernel_decode_in_bf16():
    """With the Triton kernels on (the default graph path, no fixed step), EAGLE's output is the target's own."""
    target = load_vlm("videollava", default_model_path("videollava"), device="cuda", quant="bf16")
    target.enable_cuda_graphs(1024, step_sizes=(1, 6))
    head = EagleHead(EagleHeadConfig.for_target(target)).to("cuda", target.dtype).bind(target)
    for sample in samples(4):
        reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=40).tokens
        proxy = EagleTarget(target, -1)
        state = prefill_sample(proxy, sample).state
        result = speculative_generate(proxy, state, EagleDrafter(head, proxy, state), max_new_tokens=40, gamma=5)
        assert result.tokens == reference


def test_eagle_drafter_through_run_parallel(models):
    """As a benchmark would wire --drafter eagle: the engine's target is a fresh EagleTarget per sample."""
    from common.drafters import DrafterFactory
    from common.parallel import run_parallel

    draft, target = models
    torch.manual_seed(2)
    head = EagleHead(EagleHeadConfig.for_target(target)).bind(target)
    sample = samples(1)[0]
    reference = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=10).tokens

    factory = DrafterFactory("eagle", adapter=head)
    proxy = factory.engine_target(target)
    assert isinstance(proxy, EagleTarget) and proxy.layer == -1
    out = run_parallel(draft, proxy, sample, factory, max_new_tokens=10, gamma=3, max_free_tokens=4)
    assert out.result.tokens == reference and out.free_tokens == []
