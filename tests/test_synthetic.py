"""Tests for common/synthetic.py (event simulator physics, scenes, answers) and the dataset maker."""

from __future__ import annotations

import filecmp
import json
import math

import numpy as np
import pytest

from common.errors import DataError
from common.synthetic import (
    answer_question,
    generate_clip,
    load_top_questions,
    render_frames,
    sample_scene,
    simulate_events,
    tokenizer_corpus,
)
from tests.data_fixtures import make_dataset


def _gray_clip(values_per_frame, h=12, w=16, region=(slice(2, 6), slice(3, 9)), base=100):
    frames = np.full((len(values_per_frame), h, w), base, np.uint8)
    for k, v in enumerate(values_per_frame):
        frames[k][region] = v
    return frames


def test_static_scene_gives_no_events() -> None:
    ev = simulate_events(_gray_clip([100] * 10), fps=20, noise_rate=0.0)
    assert len(ev) == 0
    noisy = simulate_events(_gray_clip([100] * 10), fps=20, noise_rate=1.0)  # 1 per pixel per second
    assert 0 < len(noisy) < 12 * 16 * 2


def test_brightening_and_darkening_polarity() -> None:
    up = simulate_events(_gray_clip([50, 200]), fps=20, threshold=0.2)
    assert len(up) > 0 and np.all(up.p == 1)
    assert set(zip(up.x.tolist(), up.y.tolist())) == {(x, y) for x in range(3, 9) for y in range(2, 6)}
    eps = 0.05
    n_expected = math.floor(math.log((200 / 255 + eps) / (50 / 255 + eps)) / 0.2)
    assert len(up) == 24 * n_expected  # several events per pixel when the change is large
    down = simulate_events(_gray_clip([200, 50]), fps=20)
    assert len(down) == len(up) and np.all(down.p == 0)


def test_crossing_timestamps_and_reference_memory() -> None:
    # one pixel ramps over two frame intervals; crossings are spread in time, sorted, inside the clip
    ev = simulate_events(_gray_clip([40, 120, 240], h=1, w=1, region=(0, 0)), fps=20)
    assert len(ev) > 4
    assert np.all(np.diff(ev.t) >= 0)
    assert ev.t.min() >= ev.time_start and ev.t.max() < ev.time_end
    assert len(np.unique(ev.t)) == len(ev)  # interpolated, not all at frame times
    # small steps below the threshold accumulate in the reference and fire later
    steps = simulate_events(_gray_clip([100, 105, 110, 115, 120, 125, 130, 135, 140], h=1, w=1, region=(0, 0)), fps=20)
    assert len(steps) >= 1 and np.all(steps.p == 1)


def test_colour_is_invisible() -> None:
    a = np.zeros((2, 4, 4, 3), np.uint8)
    a[:] = (100, 100, 100)
    a[1, 1:3, 1:3] = (100 + 30, 100 - 15, 100 + 7)  # same luma (0.299*30 - 0.587*15 + 0.114*7 ~ 0)
    assert len(simulate_events(a, noise_rate=0.0)) == 0


def test_clip_events_sorted_in_bounds_and_deterministic() -> None:
    gt, frames, ev = generate_clip(3, width=64, height=48, duration_ms=1000)
    assert frames.shape == (20, 48, 64, 3) and frames.dtype == np.uint8
    assert np.all(np.diff(ev.t) >= 0) and ev.t.min() >= 0 and ev.t.max() < 1_000_000
    assert ev.x.max() < 64 and ev.y.max() < 48
    assert ev.x.dtype == np.uint16 and ev.p.dtype == np.uint8 and ev.t.dtype == np.int64
    gt2, frames2, ev2 = generate_clip(3, width=64, height=48, duration_ms=1000)
    assert json.dumps(gt) == json.dumps(gt2)
    np.testing.assert_array_equal(frames, frames2)
    np.testing.assert_array_equal(ev.t, ev2.t)
    _, frames_500, _ = generate_clip(3, width=64, height=48, duration_ms=500)
    assert frames_500.shape[0] == 10


def test_static_things_make_events_only_under_ego_motion() -> None:
    scene = sample_scene(np.random.default_rng(5), 160, 120, 20, 10, ego_motion=False)
    scene["agents"] = []
    assert len(simulate_events(render_frames(scene), noise_rate=0.0)) == 0
    moving = sample_scene(np.random.default_rng(5), 160, 120, 20, 10, ego_motion=False)
    moving["agents"] = []
    moving["ego_motion"]["shift_px"] = [3.0 * k for k in range(10)]
    moving["strip_width"] += 40
    assert len(simulate_events(render_frames(moving), noise_rate=0.0)) > 100


def test_answers_cover_all_questions() -> None:
    questions = [q["question"] for q in load_top_questions()]
    assert len(questions) == 50 and questions[0] == "What are the key elements in this scene?"
    counts = [q["count"] for q in load_top_questions()]
    assert counts == sorted(counts, reverse=True)
    rng = np.random.default_rng(0)
    for _ in range(30):
        gt = sample_scene(rng, 64, 48, 20, 20)
        for q in questions:
            a = answer_question(q, gt)
            assert a and len(a.split()) <= 40 and a == answer_question(f"<event>\n{q}", gt)


def test_answers_follow_ground_truth() -> None:
    gt = sample_scene(np.random.default_rng(1), 64, 48, 20, 20, ego_motion=False)
    gt["agents"] = [{"kind": "car", "colour": "red", "moving": True, "direction": "left", "speed": "fast",
                     "speed_px_s": 200.0, "position": "left", "bbox": [[0, 20, 20, 30]] * 20}]
    gt["static"] = [o for o in gt["static"] if o["kind"] != "parked car"]
    assert "red car moving left" in answer_question("What are the key elements in this scene?", gt)
    assert answer_question("What is the color of the car?", gt) == "The car is red."
    assert answer_question("Is there a red car in the scene?", gt).startswith("Yes")
    assert answer_question("Is there a white car in the scene?", gt).startswith("No")
    assert answer_question("Is any vehicle moving to the left?", gt).startswith("Yes")
    assert answer_question("Are there any pedestrians in the scene?", gt).startswith("No")
    assert answer_question("Is the camera moving?", gt).startswith("No")


def test_tokenizer_corpus() -> None:
    corpus = tokenizer_corpus()
    assert len(corpus) >= 2000 and corpus == tokenizer_corpus()
    assert "What are the key elements in this scene?" in corpus


def test_maker_is_deterministic_across_workers_and_resumable(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    s1 = make_dataset(a, num_clips=3, seed=11, workers=1)
    s2 = make_dataset(b, num_clips=3, seed=11, workers=2)
    assert s1["generated"] == s2["generated"] == 3
    cmp = filecmp.dircmp(a, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 * (1 + 1 + 20 + 5 + 1 + 1) + 1
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not cmp.left_only and not cmp.right_only
    again = make_dataset(a, num_clips=3, seed=11)
    assert again["generated"] == 0 and again["skipped"] == 3
    assert (a / "EventGPT_Instruction_Subset.json").read_bytes() == (b / "EventGPT_Instruction_Subset.json").read_bytes()


def test_maker_merges_splits_and_refuses_conflicts(tmp_path) -> None:
    make_dataset(tmp_path, num_clips=2, split="test", seed=1)
    make_dataset(tmp_path, num_clips=1, split="train", seed=1)
    index = json.loads((tmp_path / "EventGPT_Instruction_Subset.json").read_text())
    assert sorted(e["split"] for e in index) == ["test", "test", "train"]
    entry = index[0]
    assert entry["conversations"][0]["value"].startswith("<event>\n")
    assert (tmp_path / entry["event_data"]).suffix == ".npz"
    # another seed into the same folder: files exist (skipped) but the index entries differ -> refused
    other = tmp_path / "other"
    make_dataset(other, num_clips=1, split="test", seed=2)
    (other / "EventGPT_Instruction_Subset.json").replace(tmp_path / "EventGPT_Instruction_Subset.json")
    with pytest.raises(DataError, match="already exists with different content"):
        make_dataset(tmp_path, num_clips=1, split="test", seed=1)


def test_maker_help(capsys) -> None:
    from scripts.make_synthetic_dataset import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--num_clips" in capsys.readouterr().out


# ----------------------------------------------------------------------------- long answers

def _scenes(n: int, seed: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, 640, 480, 20, 20) for _ in range(n)]


def test_long_answers_hold_the_clips_motion_colours_and_static_things() -> None:
    from common.synthetic import LONG_QUESTIONS, long_answer

    checked = 0
    for gt in _scenes(40):
        for question in LONG_QUESTIONS:
            text = long_answer(question, gt)
            assert len(text.split()) >= 30
            for agent in gt["agents"]:  # motion: what the events show
                assert agent["kind"] in text and agent["colour"] in text
                assert {"left": " left", "right": " right", "towards": "towards the camera",
                        "away": "away from the camera"}[agent["direction"]] in text
            for obj in gt["static"]:  # colours and static things: what only the video shows
                assert f"{obj['colour']} {obj['kind']}" in text
            assert f"{gt['road']['lanes']}" in text or ("two", "three")[gt["road"]["lanes"] - 2] in text
            checked += bool(gt["agents"]) and bool(gt["static"])
    assert checked > 20


def test_long_answers_are_deterministic_and_varied() -> None:
    from common.synthetic import LONG_QUESTIONS, long_answer

    scenes = _scenes(30)
    first = [long_answer(LONG_QUESTIONS[0], gt) for gt in scenes]
    assert first == [long_answer(LONG_QUESTIONS[0], json.loads(json.dumps(gt))) for gt in scenes]
    openings = {text.split(" ")[0] for text in first}
    assert len(openings) >= 3  # several templates
    assert sum(long_answer(LONG_QUESTIONS[1], gt) != a for gt, a in zip(scenes, first)) >= 20


def test_long_answers_reach_40_tokens_of_the_shipped_tokenizer() -> None:
    from transformers import AutoTokenizer

    from common.defaults import MODELS_DIR
    from common.synthetic import LONG_QUESTIONS, long_answer

    if not (MODELS_DIR / "videollava" / "tokenizer.json").is_file():
        pytest.skip("no shipped pair")
    tok = AutoTokenizer.from_pretrained(str(MODELS_DIR / "videollava"))
    lengths = [len(tok(long_answer(q, gt), add_special_tokens=False).input_ids)
               for gt in _scenes(100, seed=9) for q in LONG_QUESTIONS]
    assert min(lengths) >= 40


def test_answer_style_long_switches_only_the_long_questions() -> None:
    from common.synthetic import LONG_QUESTIONS, long_answer

    gt = _scenes(1)[0]
    short = {q: answer_question(q, gt) for q in [*LONG_QUESTIONS, "Is the road straight?"]}
    marked = {**gt, "answer_style": "long"}
    for q in LONG_QUESTIONS:
        assert answer_question(q, marked) == long_answer(q, gt) != short[q]
    assert answer_question("Is the road straight?", marked) == short["Is the road straight?"]
    assert answer_question("What are the key elements in this scene?", gt) == short[LONG_QUESTIONS[0]]


def test_dataset_with_long_answers(tmp_path) -> None:
    from common.data import ClipDataset
    from common.synthetic import long_answer

    make_dataset(tmp_path / "long", num_clips=2, seed=3, extra=["--long_answers"])
    make_dataset(tmp_path / "short", num_clips=2, seed=3)
    for style, folder in (("long", tmp_path / "long"), ("short", tmp_path / "short")):
        samples = [s for s in ClipDataset(folder, max_questions=2)
                   if s.question == "What are the key elements in this scene?"]
        assert len(samples) == 2
        for sample in samples:
            gt = json.loads(sample.ground_truth_path.read_text())
            assert gt.get("answer_style") == ("long" if style == "long" else None)
            expected = long_answer(sample.question, gt) if style == "long" else answer_question(sample.question, gt)
            assert sample.answer == expected


def test_long_answer_datasets_also_ask_what_happened(tmp_path) -> None:
    from common.data import ClipDataset
    from common.synthetic import load_top_questions, long_answer

    make_dataset(tmp_path / "long", num_clips=1, seed=3, extra=["--long_answers"])
    make_dataset(tmp_path / "short", num_clips=1, seed=3)
    assert not (tmp_path / "short" / "top50_questions.json").exists()
    top50 = [q["question"] for q in load_top_questions()]
    long_ds = ClipDataset(tmp_path / "long", max_questions=51)
    assert [s.question for s in long_ds] == top50 + ["What happened in this clip?"]
    assert [s.question for s in ClipDataset(tmp_path / "long", max_questions=50)] == top50  # the 50 stay
    last = long_ds[50]
    assert last.answer == long_answer(last.question, json.loads(last.ground_truth_path.read_text()))
    assert len(last.answer.split()) >= 30
