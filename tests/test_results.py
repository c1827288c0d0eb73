"""Tests for common/results.py: atomic JSON, run folders, records, summaries, tables."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common.results import (
    RunFolder,
    atomic_write_json,
    atomic_write_text,
    markdown_table,
    read_json,
    stage_means,
    summarize,
    to_jsonable,
)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    j = atomic_write_json(tmp_path / "b.json", {"x": 1, "y": [1, 2]})
    assert read_json(j) == {"x": 1, "y": [1, 2]}
    assert j.read_text().startswith("{\n  ")  # indent=2
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "sub")


def test_failed_serialisation_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert read_json(p) == {"ok": True}
    assert _no_temp_files(tmp_path)


def test_failed_write_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "r.txt"
    atomic_write_text(p, "old")

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert _no_temp_files(tmp_path)


def test_json_sanitising(tmp_path: Path) -> None:
    obj = {
        "nan": float("nan"), "inf": float("inf"), "ninf": -math.inf,
        "np_f": np.float32(1.5), "np_i": np.int64(7), "np_b": np.bool_(True),
        "np_arr": np.array([[1, 2], [3, 4]]), "np_nan": np.array([1.0, np.nan]),
        "t": torch.tensor([1.0, float("nan")]), "t0": torch.tensor(3), "tbf": torch.ones(2, dtype=torch.bfloat16),
        "path": Path("a/b"), "tuple": (1, 2), 5: "int key", "dev": torch.device("cpu"),
    }
    p = atomic_write_json(tmp_path / "s.json", obj)
    d = read_json(p)
    assert d["nan"] is None and d["inf"] is None and d["ninf"] is None
    assert d["np_f"] == 1.5 and d["np_i"] == 7 and d["np_b"] is True
    assert d["np_arr"] == [[1, 2], [3, 4]] and d["np_nan"] == [1.0, None]
    assert d["t"] == [1.0, None] and d["t0"] == 3 and d["tbf"] == [1.0, 1.0]
    assert d["path"] == "a/b" and d["tuple"] == [1, 2] and d["5"] == "int key" and d["dev"] == "cpu"
    assert "NaN" not in p.read_text()
    assert to_jsonable(argparse.Namespace(a=1)) == {"a": 1}


def test_read_json_corrupt_names_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('{"a": 1,')
    with pytest.raises(ValueError) as e:
        read_json(p)
    msg = str(e.value)
    assert "broken.json" in msg and "\n" not in msg


def test_runfolder_create_resume_done(tmp_path: Path) -> None:
    base = tmp_path / "out"
    r1 = RunFolder.create("bench", "task", output_dir=base)
    assert r1.path.parent == base and r1.path.name.startswith("task_")
    # same task, unfinished -> reused
    r2 = RunFolder.create("bench", "task", output_dir=base)
    assert r2.path == r1.path
    # a different task with a common prefix is not reused
    r_other = RunFolder.create("bench", "task_b", output_dir=base)
    assert r_other.path != r1.path
    # no resume -> a new folder even in the same second
    r3 = RunFolder.create("bench", "task", output_dir=base, resume=False)
    assert r3.path != r1.path and r3.path.exists()
    # newest unfinished reused
    assert RunFolder.create("bench", "task", output_dir=base).path == r3.path
    r3.mark_done()
    assert RunFolder.create("bench", "task", output_dir=base).path == r1.path
    r1.mark_done()
    r4 = RunFolder.create("bench", "task", output_dir=base)
    assert r4.path not in (r1.path, r3.path) and not r4.done


def test_runfolder_default_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = RunFolder.create("stage_x", "t")
    assert r.path.resolve().parent == (tmp_path / "results" / "stage_x").resolve()
    name = r.path.name
    stamp = name[len("t_"):]
    time.strptime(stamp, "%Y%m%d_%H%M%S")


def test_records_append_load_truncated(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    r.append_record({"id": "a", "x": np.float64(1.0)})
    r.append_record({"id": 2, "x": float("nan")})
    assert r.finished_ids() == {"a", "2"}
    # simulate a kill mid-write
    with open(r.records_path, "a") as f:
        f.write('{"id": "c", "x": 1')
    with pytest.warns(UserWarning, match="truncated"):
        recs = r.load_records()
    assert [x["id"] for x in recs] == ["a", 2] and recs[1]["x"] is None
    with pytest.warns(UserWarning):
        assert r.finished_ids() == {"a", "2"}
    # a resumed run appends: the partial line is cut off, the file is clean again
    with pytest.warns(UserWarning, match="truncated"):
        r.append_record({"id": "c", "x": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = RunFolder(r.path).load_records()
    assert [x["id"] for x in recs] == ["a", 2, "c"]


def test_records_partial_only_line(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    r.records_path.write_text('{"id": "a"')
    with pytest.warns(UserWarning):
        assert r.load_records() == []
    with pytest.warns(UserWarning):
        r.append_record({"id": "a"})
    assert r.records_path.read_text() == '{"id": "a"}\n'


def test_records_complete_line_without_newline_kept(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    r.records_path.write_text('{"id": "a"}')
    r.append_record({"id": "b"})
    assert [x["id"] for x in r.load_records()] == ["a", "b"]


def test_records_corrupt_middle_line_raises(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    r.records_path.write_text('{"id": "a"}\n{oops\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="records.jsonl"):
        r.load_records()


def test_write_config(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    ns = argparse.Namespace(seed=0, dataset_dir=Path("d"), quant=None)
    p = r.write_config(ns, ["--seed", "0"])
    cfg = json.loads(p.read_text())
    for key in ("args", "argv", "git_commit", "git_dirty", "versions", "device_name", "hostname", "start_time"):
        assert key in cfg
    assert cfg["args"]["dataset_dir"] == "d" and cfg["argv"] == ["--seed", "0"]
    assert "python" in cfg["versions"] and "torch" in cfg["versions"] and "numpy" in cfg["versions"]
    cfg2 = read_json(r.write_config({"a": 1, "obj": object()}, None))  # unknown objects -> str in config
    assert cfg2["args"]["a"] == 1 and cfg2["args"]["obj"].startswith("<object")


def test_write_results_markdown_done(tmp_path: Path) -> None:
    r = RunFolder.create("s", "t", output_dir=tmp_path)
    recs = [{"id": "a", "egpt_time": 0.5}]
    p = r.write_results(recs, {"egpt_time": summarize([0.5])}, extra={"note": "x"})
    d = read_json(p)
    assert d["samples"] == recs and d["statistics"]["egpt_time"]["mean"] == 0.5 and d["note"] == "x"
    assert r.write_markdown("# hi").read_text() == "# hi\n"
    r.mark_done()
    assert (r.path / "DONE").exists() and r.done
    assert _no_temp_files(r.path)


def test_summarize_and_stage_means() -> None:
    s = summarize([1.0, None, 3.0, float("nan"), 2.0])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2 / 3)), "median": 2.0, "min": 1.0, "max": 3.0,
                 "count": 3}
    assert summarize([1, 2, 3, 4])["median"] == 2.5
    assert summarize([])["count"] == 0 and summarize([None])["mean"] is None
    recs = [{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": None, "b": 4.0}]
    assert stage_means(recs, ["a", "b", "c"]) == {"a": 2.0, "b": 3.0, "c": None}


def test_markdown_table() -> None:
    t = markdown_table([{"model": "egpt", "ms": 1.23456, "n": 3}, {"model": "v|l", "ms": None}])
    lines = t.strip().splitlines()
    assert lines[0] == "| model | ms | n |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| egpt | 1.235 | 3 |"
    assert lines[3] == "| v\\|l |  |  |"
    t2 = markdown_table([{"a": 1.0, "b": 2}], columns=["b", "a"], floatfmt=".1f")
    assert t2.splitlines()[2] == "| 2 | 1.0 |"
    assert markdown_table([]) == ""
