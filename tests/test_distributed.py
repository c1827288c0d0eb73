"""Scale-out on CPU: 2 ranks (gloo) started by torchrun, the engine under ``accelerate launch``.

- hidden-state extraction as 2 ranks: each rank writes its shard, the merged view equals a
  single-process extraction (same samples, same order, same tensors);
- DDP training with 2 ranks gives the same loss curve as one process on the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from feature_alignment.hidden_store import HiddenStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is needed for 2-process tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, argv: list[str], nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc -m module argv`` on the CPU (gloo), one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", module, *argv]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{nproc}-process run of {module} did not finish in {timeout}s on this machine (busy CPU?)")
    if proc.returncode != 0 and ("EADDRINUSE" in proc.stderr or "address already in use" in proc.stderr):
        pytest.skip("the rendezvous port was taken by another process; rerun")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.data_fixtures import make_dataset

    out = tmp_path_factory.mktemp("dist_dataset")
    make_dataset(out, num_clips=3, split="train", seed=3)
    return out


def extract_argv(dataset: Path, out: Path) -> list[str]:
    return ["--dataset_dir", str(dataset), "--split", "train", "--output_dir", str(out), "--device", "cpu",
            "--max_new_tokens", "4", "--chunk_size", "2", "--batch_size", "2", "--layers", "-1"]


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    from feature_alignment.extract_hidden_states import main as extract

    out = tmp_path_factory.mktemp("dist_single") / "train"
    extract(extract_argv(dataset, out))
    return out


def rows(store: HiddenStore) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for ref in store.chunks:
        with safe_open(str(ref.path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        for i, sid in enumerate(ref.sample_ids):
            a, b = int(t["offsets"][i]), int(t["offsets"][i + 1])
            out[sid] = {k: v[a:b] for k, v in t.items() if k != "offsets"}
    return out


def test_two_rank_extraction_equals_single_process(dataset, single, tmp_path):
    out = tmp_path / "train"
    start = time.perf_counter()
    proc = launch("feature_alignment.extract_hidden_states", extract_argv(dataset, out))
    print(f"2-rank extraction: {time.perf_counter() - start:.1f}s")
    parts = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert parts == ["part_00_of_02", "part_01_of_02"]
    assert (out / "lm_head.safetensors").is_file()
    assert "'rank': 0, 'merged_complete': True, 'merged_samples': 3" in proc.stdout
    merged, one = HiddenStore.open(out), HiddenStore.open(single)
    assert merged.complete and one.complete
    assert merged.sample_ids() == one.sample_ids()  # same samples, same global order
    a, b = rows(merged), rows(one)
    for sid in one.sample_ids():
        assert a[sid].keys() == b[sid].keys()
        for k in b[sid]:
            torch.testing.assert_close(a[sid][k], b[sid][k], atol=2e-3, rtol=1e-2)
    # a rerun resumes per rank: nothing left to do, same shards
    launch("feature_alignment.extract_hidden_states", extract_argv(dataset, out))
    assert HiddenStore.open(out).sample_ids() == one.sample_ids()


def test_ddp_training_matches_one_process(single, tmp_path):
    from feature_alignment.train_hidden_adapter import main as train

    argv = ["--train_dir", str(single), "--adapter_level", "1", "--epochs", "3", "--batch_size", "2",
            "--device", "cpu", "--val_fraction", "0.34", "--no_resume", "--early_stopping", "0"]
    one = train([*argv, "--output_dir", str(tmp_path / "one")])
    start = time.perf_counter()
    launch("feature_alignment.train_hidden_adapter", [*argv, "--output_dir", str(tmp_path / "two")])
    print(f"2-rank training: {time.perf_counter() - start:.1f}s")
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert len(h1) == len(h2) == one["epochs_run"] == 3
    for r1, r2 in zip(h1, h2):
        assert r1["train_positions"] == r2["train_positions"] and r1["val_positions"] == r2["val_positions"]
        for key in ("train_loss", "val_loss", "val_cos", "val_top1"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-5), key
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    stats = json.loads((tmp_path / "two" / "results.json").read_text())["statistics"]
    assert stats["num_processes"] == 2
    assert (tmp_path / "two" / "best.safetensors").is_file() and (tmp_path / "two" / "RESULTS.md").is_file()


def _token_records(path: Path, n: int, seed: int, split: str) -> Path:
    """``n`` synthetic token-pair records (no models needed): target answers that echo the draft's, with noise."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            draft = [rng.randrange(4, 30) for _ in range(rng.randrange(2, 7))]
            target = [t if rng.random() < 0.7 else rng.randrange(4, 30) for t in draft]
            f.write(json.dumps({"id": f"{split}{i}_q0", "clip_id": f"{split}{i}", "split": split,
                                "egpt_token_ids": draft, "videollava_token_ids": target,
                                "egpt_tf_token_ids": [rng.randrange(4, 30) for _ in target],
                                "egpt_vocab_size": 40, "videollava_vocab_size": 40, "egpt_base_vocab_size": 32,
                                "videollava_base_vocab_size": 32, "max_new_tokens": 6}) + "\n")
    return path


def test_ddp_token_adapter_training_matches_one_process(tmp_path):
    from token_alignment.train_and_evaluate import main as train

    train_file = _token_records(tmp_path / "train.jsonl", 9, 0, "train")
    test_file = _token_records(tmp_path / "test.jsonl", 3, 1, "test")
    # odd global batches (3 over 2 ranks) and dropout 0, so both runs see the same numbers
    argv = ["--train_tokens", str(train_file), "--test_tokens", str(test_file), "--val_fraction", "0.3",
            "--epochs", "3", "--early_stopping", "0", "--d_model", "32", "--n_layers", "1", "--n_heads", "2",
            "--dropout", "0", "--batch_size", "3", "--device", "cpu", "--live_samples", "0", "--task_name", "t"]
    one = train([*argv, "--output_dir", str(tmp_path / "one")])
    launch("token_alignment.train_and_evaluate", [*argv, "--output_dir", str(tmp_path / "two")])
    runs = [p for p in (tmp_path / "two").iterdir() if p.is_dir() and p.name.startswith("t_")]
    assert len(runs) == 1  # only the main process writes a run folder
    two = json.loads((runs[0] / "results.json").read_text())
    h1, h2 = one["history"], two["history"]
    assert len(h1) == len(h2) == 3
    for r1, r2 in zip(h1, h2):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "lr"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert two["statistics"]["best_epoch"] == one["best_epoch"]


def test_launcher_chunks_take_the_rank_shard_unless_chunks_are_given(monkeypatch) -> None:
    from common.distributed import launcher_chunks

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert launcher_chunks(1, 0) == (4, 2, True)
    assert launcher_chunks(None, 0) == (4, 2, True)
    assert launcher_chunks(8, 5) == (8, 5, False)  # explicit --num_chunks wins
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_chunks(1, 0) == (1, 0, False)
