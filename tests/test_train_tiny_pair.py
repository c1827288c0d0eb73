"""Smoke tests of the tiny-pair trainer and the pair evaluation (CPU, seconds).

One 3-clip 64x48 dataset, tiny model sizes: a few training steps must lower the loss of both
models, the saved pair must load through ``load_vlm`` and generate, a rerun must resume, and
``scripts.evaluate_pair`` must score the pair.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.data_fixtures import make_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from scripts.train_tiny_pair import main

    root = tmp_path_factory.mktemp("train_tiny_pair")
    make_dataset(root / "data", num_clips=3, split="train", seed=3)
    out = root / "pair"
    argv = ["--dataset_dir", str(root / "data"), "--output_dir", str(out), "--size_preset", "tiny",
            "--batch_size", "4", "--questions_per_clip", "4", "--lr", "5e-3", "--lr_warmup_steps", "1",
            "--num_workers", "1", "--device", "cpu", "--seed", "0"]
    first = main([*argv, "--epochs", "3"])
    resumed = main([*argv, "--epochs", "4"])
    return root, out, first, resumed


def test_loss_decreases_for_both_models(trained):
    _, _, first, _ = trained
    assert first["steps"] == 9 and first["epochs_done"] == 3  # 3 clips, 1 clip x 4 questions per step
    for kind in ("eventgpt", "videollava"):
        start = sum(first["first_losses"][kind][:3]) / 3
        end = sum(first["last_losses"][kind][-3:]) / 3
        assert end < start - 0.2, (kind, start, end)
    assert first["parameters"]["videollava"] > first["parameters"]["eventgpt"]


def test_rerun_resumes_after_the_last_epoch(trained):
    _, out, first, resumed = trained
    assert resumed["epochs_done"] == 4 and resumed["steps"] == first["steps"] + 3
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    saved = json.loads((out / "train_tiny_pair.json").read_text())
    assert saved["epochs_done"] == 4


def test_saved_pair_loads_and_generates(trained):
    from common.data import ClipDataset
    from common.models.loader import load_vlm
    from common.speculative import autoregressive_generate

    root, out, _, _ = trained
    sample = ClipDataset(root / "data", max_questions=10)[2]
    egpt = load_vlm("eventgpt", out / "eventgpt", device="cpu")
    vllava = load_vlm("videollava", out / "videollava", device="cpu")
    assert egpt.base_vocab_size == vllava.base_vocab_size
    for vlm in (egpt, vllava):
        state = vlm.prefill(vlm.encode(sample), sample.question)
        result = autoregressive_generate(vlm, state, max_new_tokens=6)
        assert 1 <= len(result.tokens) <= 6


def test_encode_batch_equals_per_clip_encoding(trained):
    from common.models.loader import load_vlm
    from common.training import encode_batch, group_by_clip, precompute_pixels

    root, out, _, _ = trained
    clips = group_by_clip(root / "data", "train", max_questions=10)
    for kind in ("eventgpt", "videollava"):
        vlm = load_vlm(kind, out / kind, device="cpu")
        pixels = precompute_pixels(kind, clips, out / kind, 32)
        with torch.no_grad():
            batched = encode_batch(vlm, pixels.float())
            for clip, got in zip(clips, batched, strict=True):
                want = vlm.encode(clip.sample)
                assert torch.allclose(got.embeds, want.embeds, atol=1e-3), kind


def test_evaluate_pair_scores_both_models(trained, tmp_path):
    from scripts.evaluate_pair import main

    root, out, _, _ = trained
    result = main(["--dataset_dir", str(root / "data"), "--eventgpt_path", str(out / "eventgpt"),
                   "--videollava_path", str(out / "videollava"), "--max_questions", "10", "--max_samples", "4",
                   "--max_new_tokens", "4", "--device", "cpu", "--output_dir", str(tmp_path)])
    assert result["samples"] == 4
    overall = result["statistics"]["overall"]
    for model in ("eventgpt", "videollava", "blind"):
        assert 0.0 <= overall[model]["exact"] <= 1.0
    assert 0.0 <= overall["token_agreement"] <= 1.0
    assert (tmp_path.glob("evaluate_pair_*/RESULTS.md").__next__()).is_file()


def test_scoring_helpers():
    from common.training import keyword_scores, question_group, score_answer, token_f1

    gold = "The red car is moving left."
    assert score_answer(gold, gold)["exact"] == 1.0
    assert token_f1("The blue car is moving left.", gold) == pytest.approx(5 / 6)
    kw = keyword_scores("The blue car is moving left.", gold)
    assert kw["colour"] == 0.0 and kw["direction"] == 1.0 and kw["kind"] == 1.0
    assert question_group("What is the color of the car?") == "colour"
    assert question_group("Are there any poles along the road?") == "static"
    assert question_group("Is any vehicle moving to the left?") == "motion"
    assert question_group("Describe the scene in detail.") == "scene"


def test_batched_teacher_forcing_equals_the_interface(trained):
    """The trainer's batched loss == cross-entropy through vlm.teacher_forced, for both models."""
    from common.models.loader import load_vlm
    from common.training import (
        answer_ids,
        batched_teacher_forced_loss,
        encode_batch,
        encode_batch_tensor,
        group_by_clip,
        precompute_pixels,
        teacher_forced_loss,
    )

    root, out, _, _ = trained
    clips = group_by_clip(root / "data", "train", max_questions=10)
    pos = [0, 0, 1, 2, 2]
    qa = [clips[0].qa[0], clips[0].qa[4], clips[1].qa[2], clips[2].qa[7], clips[2].qa[9]]
    for kind in ("eventgpt", "videollava"):
        vlm = load_vlm(kind, out / kind, device="cpu")
        pixels = precompute_pixels(kind, clips, out / kind, 32).float()
        answers = [answer_ids(vlm, a) for _, a in qa]
        questions = [q for q, _ in qa]
        with torch.no_grad():
            visuals = encode_batch(vlm, pixels)
            ref = teacher_forced_loss(vlm, [visuals[j] for j in pos], questions, answers)
            got = batched_teacher_forced_loss(vlm, encode_batch_tensor(vlm, pixels), pos, questions, answers)
        assert got.tokens == ref.tokens and got.correct == ref.correct and got.answers_exact == ref.answers_exact
        assert torch.allclose(got.loss, ref.loss, atol=1e-5), kind


def test_white_event_image_norm_is_written_and_kept(trained, tmp_path):
    import numpy as np

    from common.models.loader import load_vlm
    from scripts.train_tiny_pair import main

    root, out, _, _ = trained
    base = ["--dataset_dir", str(root / "data"), "--size_preset", "tiny", "--models", "eventgpt", "--batch_size", "4",
            "--questions_per_clip", "4", "--num_workers", "1", "--device", "cpu", "--epochs", "1", "--no_resume"]
    main([*base, "--output_dir", str(tmp_path / "white"), "--init_from", str(out), "--event_image_norm", "white"])
    main([*base, "--output_dir", str(tmp_path / "kept"), "--init_from", str(tmp_path / "white")])
    for name in ("white", "kept"):  # a later run with the default 'keep' saves the pair's normalisation again
        config = json.loads((tmp_path / name / "eventgpt" / "preprocessor_config.json").read_text())
        assert config["image_mean"] == [1.0, 1.0, 1.0]
    egpt = load_vlm("eventgpt", tmp_path / "kept" / "eventgpt", device="cpu")
    white = np.full((48, 64, 3), 255, dtype=np.uint8)
    assert float(egpt.preprocess([white]).abs().max()) < 1e-5  # the event frames' background reaches the tower as 0
    original = json.loads((out / "eventgpt" / "preprocessor_config.json").read_text())["image_mean"]
    assert original != [1.0, 1.0, 1.0]


def test_evaluate_pair_statistics_per_long_question():
    from scripts.evaluate_pair import markdown, statistics

    def record(query, n_target, n_draft, same, group="scene"):
        return {"query": query, "group": group, "answer": "a", "egpt_exact": 0.0, "egpt_f1": 0.5, "egpt_key": 0.5,
                "egpt_keywords": {}, "videollava_exact": 1.0, "videollava_f1": 1.0, "videollava_key": 1.0,
                "videollava_keywords": {}, "egpt_token_ids": [1] * n_draft, "videollava_token_ids": [1] * n_target,
                "token_matches": same, "target_positions": n_target, "common_prefix": same, "answers_agree": False}

    records = [record("What are the key elements in this scene?", 60, 50, 30),
               record("What are the key elements in this scene?", 40, 44, 10),
               record("What happened in this clip?", 80, 70, 40),
               record("Is the camera moving?", 5, 5, 5, "motion")]
    stats = statistics(records, {"What are the key elements in this scene?": "a"})
    key = stats["long_questions"]["What are the key elements in this scene?"]
    assert key["samples"] == 2 and key["mean_tokens"] == {"eventgpt": 47.0, "videollava": 50.0}
    assert key["token_agreement"] == 40 / 100 and key["blind"]["exact"] == 1.0
    assert set(stats["long_questions"]) == {"What are the key elements in this scene?", "What happened in this clip?"}
    assert "| What happened in this clip? | 1 | 80.000 | 70.000 | 0.500 |" in markdown(stats)


def test_visual_reliance_gap_is_zero_when_visuals_are_the_same(trained, tmp_path):
    import torch

    from common.models.loader import load_vlm
    from common.training import group_by_clip, memoize_prompts
    from scripts.visual_reliance import main, reliance

    root, out, _, _ = trained
    clips = group_by_clip(root / "data", None, 10, 3)
    vlm = memoize_prompts(load_vlm("eventgpt", out / "eventgpt", quant="fp32", device="cpu"))
    vlm.model.eval()
    same = torch.randn(1, 5 + 5, vlm.model.config.hidden_size).expand(3, -1, -1)  # every clip "sees" the same
    for row in reliance(vlm, same, clips, 1).values():
        assert row["loss_gap"] == pytest.approx(0.0, abs=1e-6)
        assert row["accuracy_own"] == row["accuracy_other"]
    table = main(["--dataset_dir", str(root / "data"), "--split", "all", "--kind", "videollava",
                  "--path", str(out / "videollava"), "--max_clips", "3", "--max_questions", "10", "--shifts", "1"])
    assert table and all(r["loss_gap"] == pytest.approx(r["loss_other"] - r["loss_own"]) for r in table.values())
    with pytest.raises(SystemExit, match="max_clips"):
        main(["--dataset_dir", str(root / "data"), "--kind", "eventgpt", "--path", str(out / "eventgpt"),
              "--max_clips", "1"])
