"""Token alignment: pair extraction (resume, no duplicates), TokenAdapter, split hygiene, live losslessness."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common.defaults import default_model_path
from common.drafters.token_adapter import (
    AdapterExample,
    TokenAdapter,
    TokenAdapterConfig,
    TokenAdapterDrafter,
    simulate_live_acceptance,
)
from common.drafters.token_drafter import aligned_metrics, find_latest_adapter, load_token_adapter_drafter
from common.speculative import autoregressive_generate, speculative_generate
from token_alignment import extract_tokens
from token_alignment.pairs import (
    append_jsonl,
    file_lock,
    load_token_pairs,
    read_jsonl,
    split_by_clip,
)
from token_alignment.train_and_evaluate import main as train_main

MAX_NEW = 8
REPO = Path(__file__).resolve().parent.parent




@pytest.fixture(scope="module")
def model_paths() -> dict[str, Path]:
    return {k: default_model_path(k) for k in ("eventgpt", "videollava")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from scripts.make_synthetic_dataset import main as make

    out = tmp_path_factory.mktemp("ta_dataset")
    for split, n in (("train", 3), ("test", 1)):
        make(["--output_dir", str(out), "--num_clips", str(n), "--split", split, "--seed", "5",
              "--width", "160", "--height", "120", "--num_workers", "1"])
    return out


def _extract_args(dataset: Path, model_paths: dict, split: str, out: Path, *extra: str) -> list[str]:
    return ["--dataset_dir", str(dataset), "--split", split, "--max_new_tokens", str(MAX_NEW),
            "--eventgpt_path", str(model_paths["eventgpt"]), "--videollava_path", str(model_paths["videollava"]),
            "--device", "cpu", "--output_file", str(out), *extra]


@pytest.fixture(scope="module")
def tokens(dataset, model_paths, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ta_tokens")
    train, test = d / "train.jsonl", d / "test.jsonl"
    extract_tokens.main(_extract_args(dataset, model_paths, "train", train))
    extract_tokens.main(_extract_args(dataset, model_paths, "test", test, "--parallel"))
    return {"train": train, "test": test, "dir": d}


def _ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


def _content(path: Path) -> list[dict]:
    """Merged records without the wall-clock fields (those differ between runs)."""
    return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in load_token_pairs(path)]


# ----- extraction -----

def test_extraction_writes_complete_records(tokens, dataset):
    recs = read_jsonl(tokens["train"])
    assert len(recs) == 3 and len(set(_ids(tokens["train"]))) == 3  # compacted: one line per sample
    for r in recs:
        assert r["split"] == "train" and r["question"] and r["query"] == r["question"]
        assert r["question"] in r["egpt_prompt"] and r["question"] in r["videollava_prompt"]
        assert 1 <= len(r["egpt_token_ids"]) <= MAX_NEW and 1 <= len(r["videollava_token_ids"]) <= MAX_NEW
        assert len(r["egpt_tf_token_ids"]) == len(r["videollava_token_ids"])
        assert all(0 <= t < r["vocab_limit"] for t in r["egpt_tf_token_ids"])
        assert isinstance(r["egpt"], str) and isinstance(r["videollava"], str)
        assert r["egpt_time"] > 0 and r["videollava_time"] > 0
        assert (dataset / r["event_data"]).exists()
        # first position: no target prefix yet, so the draft's teacher-forced token is its own first token
        if r["egpt_token_ids"][0] < r["vocab_limit"]:
            assert r["egpt_tf_token_ids"][0] == r["egpt_token_ids"][0]
    assert len(load_token_pairs(tokens["test"])) == 1


def test_sequential_and_parallel_agree(tokens, dataset, model_paths, tmp_path):
    out = tmp_path / "test_seq.jsonl"
    extract_tokens.main(_extract_args(dataset, model_paths, "test", out))
    keys = ("egpt_token_ids", "videollava_token_ids", "egpt_tf_token_ids")
    a, b = load_token_pairs(out), load_token_pairs(tokens["test"])
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_batched_extraction_writes_the_same_records(tokens, dataset, model_paths, tmp_path):
    """--batch_size 2 over 3 samples (a full and a partial batch): the records equal one at a time."""
    out = tmp_path / "train_batched.jsonl"
    extract_tokens.main(_extract_args(dataset, model_paths, "train", out, "--batch_size", "2"))
    assert _ids(out) == _ids(tokens["train"])
    assert _content(out) == _content(tokens["train"])


def test_killed_extraction_resumes_without_loss_or_duplicates(tokens, dataset, model_paths, tmp_path, monkeypatch):
    out = tmp_path / "train.jsonl"
    real = extract_tokens._answer
    calls = {"egpt": 0, "videollava": 0}

    def dying(model, cache, sample, max_new_tokens, prefix):
        calls[prefix] += 1
        if prefix == "videollava" and calls[prefix] == 2:
            raise KeyboardInterrupt("killed")  # the second target answer never finishes
        return real(model, cache, sample, max_new_tokens, prefix)

    monkeypatch.setattr(extract_tokens, "_answer", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_tokens.main(_extract_args(dataset, model_paths, "train", out))
    assert calls == {"egpt": 3, "videollava": 2}
    with open(out, "a") as f:  # a kill in the middle of writing a line
        f.write('{"id": "synthetic_train_seq_000_000002", "videollava_tok')
    calls.update(egpt=0, videollava=0)
    monkeypatch.setattr(extract_tokens, "_answer", lambda *a: (calls.__setitem__(a[-1], calls[a[-1]] + 1),
                                                               real(*a))[1])
    with pytest.warns(UserWarning, match="truncated"):
        summary = extract_tokens.main(_extract_args(dataset, model_paths, "train", out))
    assert calls == {"egpt": 0, "videollava": 2}  # only the unfinished target answers are redone
    assert summary["num_complete"] == 3
    assert _ids(out) == _ids(tokens["train"])  # compacted, same order, no duplicates
    assert _content(out) == _content(tokens["train"])


def test_resuming_with_other_models_is_refused(tokens, dataset, model_paths, tmp_path):
    out = tmp_path / "mixed.jsonl"
    rec = dict(read_jsonl(tokens["test"])[0], egpt_model={"path": "/elsewhere/eventgpt", "weights_bytes": 1})
    append_jsonl(out, rec)
    with pytest.raises(SystemExit, match="other|not"):
        extract_tokens.main(_extract_args(dataset, model_paths, "test", out))
    assert read_jsonl(tokens["test"])[0]["egpt_model"]["path"] == str(model_paths["eventgpt"].resolve())


def test_file_lock_makes_a_second_writer_wait(tmp_path):
    target = tmp_path / "x.jsonl"
    got = threading.Event()

    def second():
        with file_lock(target, poll_seconds=0.02, log=lambda m: None):
            got.set()

    with file_lock(target):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        assert not got.is_set()
    t.join(5)
    assert got.is_set()


def test_append_and_read_jsonl_drop_a_truncated_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    append_jsonl(path, {"id": "a"})
    path.write_text(path.read_text() + '{"id": "b", "x"')
    with pytest.warns(UserWarning):
        assert read_jsonl(path) == [{"id": "a"}]
    with pytest.warns(UserWarning):
        append_jsonl(path, {"id": "c"})
    assert read_jsonl(path) == [{"id": "a"}, {"id": "c"}]


# ----- splits -----

def test_validation_split_is_by_clip_and_stable():
    recs = [{"id": f"c{c}_q{q}", "clip_id": f"c{c}"} for c in range(20) for q in range(10)]
    train, val = split_by_clip(recs, 0.1)
    assert len({r["clip_id"] for r in val}) == 2 and len(val) == 20
    assert not {r["clip_id"] for r in train} & {r["clip_id"] for r in val}
    train2, val2 = split_by_clip(list(reversed(recs)), 0.1)
    assert sorted(r["id"] for r in val2) == sorted(r["id"] for r in val)
    with pytest.raises(ValueError):
        split_by_clip(recs[:10], 0.1)  # one clip: nothing to hold out


def _train_args(tokens: dict, test: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_tokens", str(tokens["train"]), "--test_tokens", str(test), "--task_name", "t",
            "--output_dir", str(out), "--epochs", "3", "--early_stopping", "0", "--d_model", "32",
            "--n_layers", "1", "--n_heads", "2", "--batch_size", "2", "--device", "cpu", "--live_samples", "0",
            "--gamma", "3", *extra]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_test_split_never_influences_selection(tokens, tmp_path):
    recs = read_jsonl(tokens["test"])
    other = tmp_path / "other_test.jsonl"
    for r in recs:  # a very different test set
        r = dict(r, id=r["id"] + "_x", videollava_token_ids=r["egpt_token_ids"][:3] + [5, 6],
                 egpt_tf_token_ids=[1, 2, 3, 4, 5])
        append_jsonl(other, r)
    a = train_main(_train_args(tokens, tokens["test"], tmp_path / "a"))
    b = train_main(_train_args(tokens, other, tmp_path / "b"))
    assert a["best_epoch"] == b["best_epoch"]
    assert a["history"] == b["history"]
    assert _sha(Path(a["checkpoint"]) / "model.safetensors") == _sha(Path(b["checkpoint"]) / "model.safetensors")
    assert a["statistics"]["test_teacher_forced"] != b["statistics"]["test_teacher_forced"]
    assert a["statistics"]["data"]["val_clips"] == 1 and a["statistics"]["data"]["train_clips"] == 2
    run = Path(a["run_dir"])
    for name in ("results.json", "RESULTS.md", "training_curves.png", "loss_curve.png", "accuracy_curve.png",
                 "DONE", "checkpoint/config.json", "config.json"):
        assert (run / name).exists(), name


# ----- the adapter and its drafter -----

def _config(**kw) -> TokenAdapterConfig:
    base = dict(draft_vocab_size=40, target_vocab_size=48, vocab_limit=36, d_model=16, n_layers=1, n_heads=2,
                dropout=0.0, max_draft_len=8, max_positions=16)
    return TokenAdapterConfig(**{**base, **kw})


def test_checkpoint_roundtrip_and_padding_invariance(tmp_path):
    torch.manual_seed(0)
    model = TokenAdapter(_config()).eval()
    model.save_pretrained(tmp_path / "ckpt", extra={"note": 1})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "token_adapter" and config["extra"] == {"note": 1}
    loaded = TokenAdapter.from_pretrained(tmp_path / "ckpt")
    exs = [AdapterExample([3, 4, 5], [7, 8, 9, 47], [1, 2, 3, 4]), AdapterExample([], [6], [2])]
    with torch.no_grad():
        batch_logits = model(model.collate(exs))
        assert torch.allclose(batch_logits, loaded(loaded.collate(exs)))
        # live (one sample, no padding) sees exactly what the batch saw
        assert torch.allclose(model.next_logits([3, 4, 5], [7, 8], [1, 2, 3]), batch_logits[0, 2], atol=1e-5)
        assert torch.allclose(model.next_logits([], [], [2]), batch_logits[1, 0], atol=1e-5)
    assert model.collate(exs)["labels"][0].tolist() == [7, 8, 9, -100]  # 47 >= vocab_limit: unpredictable


def test_simulate_live_acceptance():
    assert simulate_live_acceptance([True] * 8, gamma=3)["iterations"] == [(3, 3), (3, 3)]
    assert simulate_live_acceptance([True] * 9, gamma=3)["iterations"] == [(3, 3), (3, 3), (0, 0)]
    assert simulate_live_acceptance([False] * 3, gamma=2)["iterations"] == [(2, 0), (1, 0), (0, 0)]
    assert simulate_live_acceptance([True] * 4, gamma=5, max_new_tokens=4)["iterations"] == [(3, 3)]


@pytest.fixture(scope="module")
def pair(model_paths):
    from common.models.loader import load_vlm

    return {k: load_vlm(k, p, quant="fp32", device="cpu") for k, p in model_paths.items()}


@pytest.mark.parametrize("features", ["both", "answer", "next"])
def test_adapter_drafter_is_lossless(pair, dataset, features):
    from common.data import ClipDataset

    egpt, vllava = pair["eventgpt"], pair["videollava"]
    limit = min(egpt.base_vocab_size, vllava.base_vocab_size)
    torch.manual_seed(1)
    adapter = TokenAdapter(_config(draft_vocab_size=egpt.vocab_size, target_vocab_size=vllava.vocab_size,
                                   vocab_limit=limit, max_draft_len=MAX_NEW, draft_answer_tokens=MAX_NEW,
                                   use_draft_answer=features != "next", use_draft_next=features != "answer"))
    sample = ClipDataset(dataset, "test")[0]
    ve, vv = egpt.encode(sample), vllava.encode(sample)
    expected = autoregressive_generate(vllava, vllava.prefill(vv, sample.question), max_new_tokens=12).tokens
    for gamma in (1, 4):
        kw = {}
        if features == "answer":  # precomputed draft answer: no draft model needed at all
            kw["draft_tokens"] = autoregressive_generate(egpt, egpt.prefill(ve, sample.question),
                                                         max_new_tokens=MAX_NEW).tokens
            drafter = TokenAdapterDrafter(adapter, vocab_limit=limit, **kw)
        else:
            drafter = TokenAdapterDrafter(adapter, draft_model=egpt, draft_state=egpt.prefill(ve, sample.question),
                                          vocab_limit=limit)
        result = speculative_generate(vllava, vllava.prefill(vv, sample.question), drafter,
                                      max_new_tokens=12, gamma=gamma)
        assert result.tokens == expected
        assert all(0 <= t < limit for _, toks, _ in drafter.proposals for t in toks)
        hits, tested = drafter.top5_counts(result.tokens)
        assert 0 <= hits <= tested and tested >= result.num_verify_steps - 1
        if features == "answer":
            assert drafter.stats["steps"] == 0  # no draft-model forward per step


def test_train_evaluate_live_and_benchmark_api(tokens, dataset, model_paths, tmp_path, pair):
    out = tmp_path / "task"
    res = train_main(_train_args(tokens, tokens["test"], out, "--live_samples", "1", "--star", "--epochs", "2",
                                 "--eventgpt_path", str(model_paths["eventgpt"]),
                                 "--videollava_path", str(model_paths["videollava"]), "--dataset_dir", str(dataset)))
    stats = res["statistics"]
    live, tf = stats["live"], stats["test_teacher_forced"]
    assert live["raw"]["lossless_rate"] == 1.0 and live["adapter"]["lossless_rate"] == 1.0
    assert live["reference_matches_extraction_rate"] == 1.0
    # the live number holds up: it is what the teacher-forced hits on the same samples predict for the
    # greedy loop (exact up to float ties between batched and cached forwards)
    same = live["teacher_forced_same_samples"]
    assert same["num_samples"] == 1 and tf["num_samples"] == 1
    assert live["adapter"]["acceptance_rate"] == pytest.approx(same["predicted_live_adapter"]["acceptance_rate"],
                                                               abs=0.06)
    assert live["raw"]["acceptance_rate"] == pytest.approx(same["predicted_live_raw"]["acceptance_rate"], abs=0.06)
    assert "| TokenAdapter |" in (Path(res["run_dir"]) / "RESULTS.md").read_text()
    assert (out / "starred" / Path(res["run_dir"]).name / "checkpoint" / "model.safetensors").is_file()
    # what the benchmarks call
    ckpt = find_latest_adapter(out)
    assert ckpt is not None and ckpt.name == "checkpoint"
    assert find_latest_adapter(tmp_path / "nothing_here") is None
    assert find_latest_adapter(out, eventgpt_path=model_paths["eventgpt"],
                               videollava_path=model_paths["videollava"]) is not None
    assert find_latest_adapter(out, eventgpt_path=tmp_path / "another_eventgpt") is None
    from common.data import ClipDataset

    egpt, vllava = pair["eventgpt"], pair["videollava"]
    limit = min(egpt.base_vocab_size, vllava.base_vocab_size)
    sample = ClipDataset(dataset, "test")[0]
    ve, vv = egpt.encode(sample), vllava.encode(sample)
    drafter = load_token_adapter_drafter(ckpt, egpt, egpt.prefill(ve, sample.question), limit)
    result = speculative_generate(vllava, vllava.prefill(vv, sample.question), drafter, max_new_tokens=MAX_NEW,
                                  gamma=3)
    assert result.tokens == live_sample_tokens(res)
    m = aligned_metrics([(0.1, drafter.annotate(result)), ({"acceptance_rate": 0.3}, {"acceptance_rate": 0.5,
                                                                                      "top5_rate": 1.0})])
    assert m["aligned_num_samples"] == 2 and m["raw_acceptance_rate_avg"] == pytest.approx(0.2)
    assert m["aligned_improvement"] == pytest.approx(m["aligned_acceptance_rate_avg"] - 0.2)
    assert m["aligned_acceptance_rate_std"] is not None and m["aligned_top5_rate_avg"] is not None


def live_sample_tokens(res: dict) -> list[int]:
    data = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    return data["samples"][0]["videollava_token_ids"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TOKEN_ALIGNMENT_WORKFLOW_TEST") != "1",
                    reason="~30 s subprocess run; set TOKEN_ALIGNMENT_WORKFLOW_TEST=1 to run it")
def test_workflow_script_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, DATASET_DIR=str(tmp_path / "ds"), SYNTH_TRAIN_CLIPS="3",
               SYNTH_TEST_CLIPS="1", SYNTH_WIDTH="160", SYNTH_HEIGHT="120", MAX_NEW_TOKENS="6", EPOCHS="2",
               LIVE_SAMPLES="1", D_MODEL="32", N_LAYERS="1", TOKENS_DIR=str(tmp_path / "tok"),
               TASK_ROOT=str(tmp_path / "task"), LOG_DIR=str(tmp_path / "logs"))
    for _ in range(2):  # the second run resumes: nothing is redone
        proc = subprocess.run(["bash", str(REPO / "token_alignment" / "run_1q_workflow.sh")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training already done" in proc.stdout
    assert find_latest_adapter(tmp_path / "task") is not None
    shutil.rmtree(tmp_path, ignore_errors=True)
