"""Feature alignment: hidden-state extraction (chunks, resume, signals), adapters L1-L5, streamed
training with bounded memory, and lossless adapter drafting through the speculative engine."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open

from common.drafters.hidden_adapter import (
    LEVELS,
    create_adapter,
    load_any_adapter,
    masked_logits,
    save_adapter,
    scaled_width,
)
from common.drafters.hidden_drafter import (
    HiddenAdapterDrafter,
    adapter_input_layers,
    load_hidden_adapter_drafter,
)
from common.speculative import autoregressive_generate, speculative_generate
from feature_alignment import extract_hidden_states as extract
from feature_alignment.hidden_store import (
    INDEX_FILE,
    LIVE_CHUNKS,
    LM_HEAD_FILE,
    LOCK_FILE,
    HiddenStore,
    SampleRecord,
    chunk_name,
    extraction_complete,
    load_index,
    load_lm_head,
    new_index,
    save_index,
    save_lm_head,
    write_chunk,
)
from feature_alignment.train_hidden_adapter import held_out_ids
from feature_alignment.train_hidden_adapter import main as train_main

MAX_NEW = 6




def extract_argv(dataset, out, chunk_size=2, batch_size=2):
    return ["--dataset_dir", str(dataset), "--split", "train", "--output_dir", str(out), "--device", "cpu",
            "--max_new_tokens", str(MAX_NEW), "--chunk_size", str(chunk_size), "--batch_size", str(batch_size),
            "--layers", "-1,-2"]


@pytest.fixture(scope="module")
def extracted(fa_dataset, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fa_hidden") / "train"
    summary = extract.main(extract_argv(fa_dataset, out), models=models)
    return out, summary


def per_sample(folder):
    """sample id -> {tensor name: that sample's rows} over every chunk, in stored order."""
    out = {}
    for c in load_index(folder)["chunks"]:
        with safe_open(str(folder / c["file"]), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        off = tensors["offsets"]
        for i, sid in enumerate(c["sample_ids"]):
            assert sid not in out, f"duplicate sample {sid}"
            out[sid] = {k: v[off[i]:off[i + 1]] for k, v in tensors.items() if k != "offsets"}
    return out


# ----------------------------------------------------------------------------- extraction

def test_extraction_writes_chunks_index_and_target_ids(extracted, models, fa_dataset):
    out, summary = extracted
    draft, target = models
    assert summary["complete"] and summary["num_samples"] == 4 and summary["num_chunks"] == 2
    assert not (out / LOCK_FILE).exists()
    index = load_index(out)
    assert index["complete"] and [c["file"] for c in index["chunks"]] == [chunk_name(0), chunk_name(1)]
    from common.data import ClipDataset

    ds = ClipDataset(fa_dataset, split="train")
    assert [s for c in index["chunks"] for s in c["sample_ids"]] == [s.id for s in ds.samples]  # deterministic order
    assert index["config"]["draft_hidden_size"] == draft.hidden_size
    assert index["config"]["target_hidden_size"] == target.hidden_size

    samples = per_sample(out)
    sample = ds[0]
    expected = autoregressive_generate(target, target.prefill(target.encode(sample), sample.question),
                                       max_new_tokens=MAX_NEW).tokens
    rows = samples[sample.id]
    assert rows["target_ids"].tolist() == expected  # the target's own greedy answer
    n = len(expected)
    for model, size in (("eventgpt", draft.hidden_size), ("videollava", target.hidden_size)):
        for layer in (-1, -2):
            t = rows[f"{model}.{layer}"]
            assert t.dtype == torch.float16 and t.shape == (n, size)
    # row t of the target's final state re-predicts target token t: aligned by position
    logits = target.lm_head(rows["videollava.-1"].float())
    assert logits.argmax(-1).tolist() == expected
    assert summary["self_check_rate"] == 1.0
    head, meta = load_lm_head(out / LM_HEAD_FILE)
    assert head.shape == target.lm_head.weight.shape
    assert meta["shared_vocab_size"] == min(draft.base_vocab_size, target.base_vocab_size)


def test_killed_extraction_resumes_with_identical_content(extracted, fa_dataset, models, tmp_path, monkeypatch):
    clean, _ = extracted
    out = tmp_path / "train"
    real = extract.extract_batch
    calls = {"n": 0}

    def dies_on_second_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(extract, "extract_batch", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        extract.main(extract_argv(fa_dataset, out), models=models)
    index = load_index(out)
    assert not index["complete"] and len(index["chunks"]) == 1  # only the unfinished chunk was lost
    assert not (out / LOCK_FILE).exists()

    monkeypatch.setattr(extract, "extract_batch", real)
    summary = extract.main(extract_argv(fa_dataset, out), models=models)
    assert summary["complete"] and summary["new_samples"] == 2 and summary["num_samples"] == 4
    assert load_index(out)["chunks"][0]["sample_ids"] == load_index(clean)["chunks"][0]["sample_ids"]
    for k in range(2):  # same chunks, same order, identical tensors
        with safe_open(str(clean / chunk_name(k)), framework="pt") as a, safe_open(str(out / chunk_name(k)),
                                                                                    framework="pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    again = extract.main(extract_argv(fa_dataset, out), models=models)  # nothing left to do, nothing duplicated
    assert again["new_samples"] == 0 and again["num_samples"] == 4


def test_sigterm_flushes_the_current_chunk_and_exits_cleanly(extracted, fa_dataset, models, tmp_path, monkeypatch):
    clean, _ = extracted
    out = tmp_path / "train"
    real = extract.extract_batch

    def terminated_during_batch(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: this batch still finishes
        return real(*a, **kw)

    monkeypatch.setattr(extract, "extract_batch", terminated_during_batch)
    before = signal.getsignal(signal.SIGTERM)
    summary = extract.main(extract_argv(fa_dataset, out, chunk_size=4), models=models)
    assert summary["interrupted"] and summary["signal"] == signal.SIGTERM and not summary["complete"]
    assert summary["num_samples"] == 2 and summary["num_chunks"] == 1  # the partial chunk was written
    assert signal.getsignal(signal.SIGTERM) is before and not (out / LOCK_FILE).exists()  # handlers restored

    monkeypatch.setattr(extract, "extract_batch", real)
    assert extract.main(extract_argv(fa_dataset, out, chunk_size=4), models=models)["complete"]
    got, want = per_sample(out), per_sample(clean)
    assert list(got) == list(want)
    for sid in want:
        for key in want[sid]:
            assert torch.equal(got[sid][key], want[sid][key]), (sid, key)


def test_sharded_extraction_merges_in_order(extracted, fa_dataset, models, tmp_path):
    clean, _ = extracted
    root = tmp_path / "train"
    for k in range(2):
        summary = extract.main(extract_argv(fa_dataset, root) + ["--num_chunks", "2", "--chunk_idx", str(k)], models=models)
        assert summary["complete"] and summary["output_dir"].endswith(f"part_{k:02d}_of_02")
        assert extraction_complete(root) == (k == 1)
    store = HiddenStore.open(root)
    assert store.sample_ids() == HiddenStore.open(clean).sample_ids() and store.lm_head_path() == root / LM_HEAD_FILE
    assert per_sample(root / "part_01_of_02").keys() <= per_sample(clean).keys()


def test_a_bad_clip_is_recorded_and_the_rest_extracted(extracted, fa_dataset, models, tmp_path):
    """A truncated mp4: its sample is listed under failed with the file named; the others match."""
    import shutil

    from common.data import ClipDataset

    data = tmp_path / "data"
    shutil.copytree(fa_dataset, data)
    bad = ClipDataset(data, split="train")[1]
    bad.video_path.write_bytes(bad.video_path.read_bytes()[:300])
    out = tmp_path / "train"
    summary = extract.main(extract_argv(data, out), models=models)
    index = load_index(out)
    assert summary["complete"] and summary["failed"] == 1 and summary["num_samples"] == 3
    assert [f["id"] for f in index["failed"]] == [bad.id] and str(bad.video_path) in index["failed"][0]["error"]
    want, got = per_sample(extracted[0]), per_sample(out)
    assert got.keys() == want.keys() - {bad.id}
    for sid in got:
        assert got[sid]["target_ids"].tolist() == want[sid]["target_ids"].tolist()


def test_resume_refuses_other_settings(extracted, fa_dataset, models):
    out, _ = extracted
    argv = extract_argv(fa_dataset, out)
    argv[argv.index("--max_new_tokens") + 1] = str(MAX_NEW + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        extract.main(argv, models=models)


def test_teacher_forced_target_states_match_the_greedy_pass(extracted, fa_dataset, models, tmp_path):
    """--target_states teacher_forced (second target pass) stores what the greedy pass recorded."""
    clean, _ = extracted
    out = tmp_path / "train"
    summary = extract.main(extract_argv(fa_dataset, out) + ["--target_states", "teacher_forced"], models=models)
    assert summary["complete"] and summary["self_check_rate"] == 1.0
    want, got = per_sample(clean), per_sample(out)
    assert want.keys() == got.keys()
    for sid, rows in want.items():
        assert got[sid]["target_ids"].tolist() == rows["target_ids"].tolist()
        for name, tensor in rows.items():
            if name != "target_ids":
                assert torch.allclose(got[sid][name].float(), tensor.float(), atol=2e-3, rtol=2e-3), (sid, name)


def test_folders_from_before_target_states_resume_as_teacher_forced(extracted, fa_dataset, models, tmp_path):
    import shutil

    out = tmp_path / "train"
    shutil.copytree(extracted[0], out)
    index = load_index(out)
    del index["config"]["target_states"]
    save_index(out, index)
    with pytest.raises(ValueError, match="target_states: 'teacher_forced' -> 'greedy_pass'"):
        extract.main(extract_argv(fa_dataset, out), models=models)
    assert extract.main(extract_argv(fa_dataset, out) + ["--target_states", "teacher_forced"], models=models)["complete"]


# ----------------------------------------------------------------------------- adapters and training

def test_adapter_widths_scale_and_checkpoints_carry_their_config(tmp_path):
    assert scaled_width(256, 4096, 4096) == 256 and scaled_width(256, 64, 96) == 32
    assert create_adapter(3, 4096, 4096).config.bottleneck == 1024
    x, tokens = torch.randn(2, 5, 64), torch.randint(0, 50, (2, 5))
    for level in LEVELS:
        adapter = create_adapter(level, 64, 96, vocab_size=50, num_heads=4).eval()
        path = save_adapter(adapter, tmp_path / f"L{level}.safetensors", {"input_layer": -2})
        loaded = load_any_adapter(path)
        assert loaded.config == adapter.config and loaded.meta["input_layer"] == -2
        a, na = adapter(x, tokens=tokens)
        b, nb = loaded(x, tokens=tokens)
        assert a.shape == (2, 5, 96) and torch.allclose(a, b)
        assert (na is None) == (level != 5)
        if adapter.causal_sequence:  # row t never sees rows after t
            cut, _ = adapter(x[:, :3], tokens=tokens[:, :3])
            assert torch.allclose(cut, a[:, :3], atol=1e-5)


def test_held_out_split_is_deterministic_disjoint_and_by_clip():
    ids = [f"clip{c}_q{q}" for c in range(10) for q in range(3)]
    val = held_out_ids(ids, 0.2, seed=1)
    assert val == held_out_ids(list(reversed(ids)), 0.2, seed=1) and len(val) == 6
    by_clip = held_out_ids(ids, 0.2, seed=1, by="clip")
    clips = {s.rsplit("_q", 1)[0] for s in by_clip}
    assert len(clips) == 2 and len(by_clip) == 6


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_each_level_trains_an_epoch(extracted, tmp_path, level):
    hidden, _ = extracted
    out = tmp_path / f"L{level}"
    summary = train_main(["--train_dir", str(hidden), "--adapter_level", str(level), "--output_dir", str(out),
                          "--epochs", "1", "--batch_size", "2", "--val_fraction", "0.25", "--device", "cpu",
                          "--num_heads", "4"])
    assert summary["epochs_run"] == 1 and summary["val_samples"] == 1 and summary["train_samples"] == 3
    history = json.loads((out / "history.json").read_text())
    row = history[0]
    for key in ("train_loss", "val_loss", "val_cos", "val_acc@0.80", "val_acc@0.90", "val_acc@0.95", "val_top1",
                "val_top5"):
        assert row[key] is not None, key
    if level == 5:
        assert row["val_next_cos"] is not None and row["val_next_top1"] is not None
    for name in ("best.safetensors", "last.safetensors", "config.json", "RESULTS.md", "training_curves.png"):
        assert (out / name).is_file(), name
    adapter = load_any_adapter(out)
    assert adapter.level == level and adapter.meta["input_layer"] == -1
    if level == 1:  # resume: a second run continues from epoch 1 and keeps its history
        again = train_main(["--train_dir", str(hidden), "--adapter_level", "1", "--output_dir", str(out),
                            "--epochs", "2", "--batch_size", "2", "--val_fraction", "0.25", "--device", "cpu",
                            "--num_heads", "4"])
        history2 = json.loads((out / "history.json").read_text())
        assert again["epochs_run"] == 2 and [h["epoch"] for h in history2] == [1, 2]
        assert history2[0] == history[0]


def _synthetic_store(folder, num_chunks, samples_per_chunk=6, length=9, h_in=64, h_out=96, vocab=120):
    """An extraction folder of random states, as extract_hidden_states writes it."""
    g = torch.Generator().manual_seed(num_chunks)
    config = {"layers": [-1], "draft_hidden_size": h_in, "target_hidden_size": h_out, "target_num_layers": 3,
              "shared_vocab_size": 100, "target_vocab_size": vocab, "split": "train",
              "eventgpt_path": "e", "videollava_path": "v"}
    index = new_index(config, [])
    for k in range(num_chunks):
        records = [SampleRecord(id=f"c{k}_s{i}", target_ids=torch.randint(0, 100, (length,), generator=g).tolist(),
                                draft={-1: torch.randn(length, h_in, generator=g)},
                                target={-1: torch.randn(length, h_out, generator=g)})
                   for i in range(samples_per_chunk)]
        index["chunks"].append(write_chunk(folder / chunk_name(k), records, [-1]))
    index["complete"] = True
    save_index(folder, index)
    save_lm_head(folder / LM_HEAD_FILE, torch.randn(vocab, h_out, generator=g), {"shared_vocab_size": 100})
    return folder


def test_training_memory_stays_flat_as_chunks_grow(tmp_path, level=1):
    peaks = {}
    for n in (2, 8):
        store = _synthetic_store(tmp_path / f"h{n}", n)
        chunk_bytes = max(c.stat().st_size for c in store.glob("chunk_*.safetensors"))
        LIVE_CHUNKS.reset_peaks()
        train_main(["--train_dir", str(store), "--adapter_level", str(level), "--output_dir", str(tmp_path / f"o{n}"),
                    "--epochs", "1", "--batch_size", "4", "--device", "cpu", "--num_heads", "4"])
        assert LIVE_CHUNKS.loads == 2 * n  # one train pass + one validation pass, a chunk at a time
        peaks[n] = (LIVE_CHUNKS.peak, LIVE_CHUNKS.peak_bytes)
        assert LIVE_CHUNKS.peak <= 2 and LIVE_CHUNKS.peak_bytes <= 2 * chunk_bytes
    assert peaks[8][0] == peaks[2][0]  # the same number of chunks in memory at 4x the data


def test_store_streams_chunks_and_refuses_test_split_for_validation(tmp_path):
    store = HiddenStore.open(_synthetic_store(tmp_path / "h", 3))
    assert store.num_samples == 18 and store.complete and store.lm_head_path() is not None
    assert [len(c) for c in store.iter_chunks(-1, -1, order=[2, 0])] == [6, 6]
    test_dir = _synthetic_store(tmp_path / "t", 1)
    index = json.loads((test_dir / INDEX_FILE).read_text())
    index["config"]["split"] = "test"
    (test_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="test split"):
        train_main(["--train_dir", str(tmp_path / "h"), "--val_dir", str(test_dir), "--adapter_level", "1",
                    "--output_dir", str(tmp_path / "o"), "--epochs", "1", "--device", "cpu"])


# ----------------------------------------------------------------------------- drafting

@pytest.fixture(scope="module")
def trained(extracted, tmp_path_factory):
    hidden, _ = extracted
    out = {}
    for level in (1, 5):
        folder = tmp_path_factory.mktemp(f"fa_L{level}")
        train_main(["--train_dir", str(hidden), "--adapter_level", str(level), "--output_dir", str(folder),
                    "--epochs", "2", "--batch_size", "2", "--val_fraction", "0.25", "--device", "cpu",
                    "--num_heads", "4"])
        out[level] = folder
    return out


@pytest.mark.parametrize("level", [1, 5])
def test_adapter_drafting_is_lossless(trained, models, fa_dataset, level):
    from common.data import ClipDataset

    draft, target = models
    path = trained[level]
    ds = ClipDataset(fa_dataset, split="train")
    drafted = 0
    for i in range(2):
        sample = ds[i]
        d_vis, t_vis = draft.encode(sample), target.encode(sample)
        for gamma in (1, 3):
            expected = autoregressive_generate(target, target.prefill(t_vis, sample.question),
                                               max_new_tokens=10).tokens
            state = draft.prefill(d_vis, sample.question, hidden_layers=adapter_input_layers(path))
            drafter = load_hidden_adapter_drafter(path, draft, state, target)
            result = speculative_generate(target, target.prefill(t_vis, sample.question), drafter,
                                          max_new_tokens=10, gamma=gamma)
            assert result.tokens == expected, (level, gamma, sample.id)
            assert drafter.state.length == drafter.state.prompt_length + len(drafter.fed_tokens)
            drafted += result.num_drafted
            if level == 5 and gamma == 3:  # feature-space drafting: one draft forward per verify step at most
                assert drafter.stats["steps"] <= result.num_verify_steps
    assert drafted > 0


def test_drafter_states_match_the_extracted_rows(trained, extracted, models, fa_dataset):
    """After syncing to k target tokens the drafter holds extraction row k: aligned by position."""
    from common.data import ClipDataset

    draft, target = models
    hidden, _ = extracted
    adapter = load_any_adapter(trained[1])
    sample = ClipDataset(fa_dataset, split="train")[0]
    rows = per_sample(hidden)[sample.id]
    answer = rows["target_ids"].tolist()
    limit = min(draft.base_vocab_size, target.base_vocab_size)
    state = draft.prefill(draft.encode(sample), sample.question, hidden_layers=[-1])
    drafter = HiddenAdapterDrafter(adapter, draft, state, target.lm_head, vocab_limit=limit)
    for k in range(len(answer)):
        proposed = drafter.propose(answer[:k], 1).tokens
        live_row = drafter.states[k]
        assert torch.allclose(live_row.float(), rows["eventgpt.-1"][k].float(), atol=2e-2, rtol=1e-2)
        live = masked_logits(adapter(live_row)[0], target.lm_head, limit)
        assert proposed == [int(live.argmax())]


def test_drafter_needs_the_hidden_layer_in_the_prefill(trained, models, fa_dataset):
    from common.data import ClipDataset

    draft, target = models
    sample = ClipDataset(fa_dataset, split="train")[0]
    state = draft.prefill(draft.encode(sample), sample.question)
    with pytest.raises(ValueError, match="hidden_layers"):
        load_hidden_adapter_drafter(trained[1], draft, state, target)


def test_evaluation_script_offline_and_live(trained, extracted, models, fa_dataset, tmp_path):
    from feature_alignment.evaluate_hidden_adapter import main as evaluate_main

    hidden, _ = extracted
    out = evaluate_main(["--adapter", str(trained[5]), "--hidden_dir", str(hidden), "--dataset_dir", str(fa_dataset),
                         "--split", "train", "--live_samples", "1", "--max_new_tokens", "6", "--gamma", "3",
                         "--device", "cpu", "--output_dir", str(tmp_path)], models=models)
    assert out["offline"]["positions"] == sum(len(v["target_ids"]) for v in per_sample(hidden).values())
    assert out["offline"]["top1"] is not None and out["offline"]["next_top1"] is not None
    assert out["live"]["lossless"] and out["live"]["model_drafter"]["num_samples"] == 1
    assert "lossless" in (tmp_path / "RESULTS.md").read_text()
