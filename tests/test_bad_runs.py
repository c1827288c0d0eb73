"""Bad runs (issue #16): kills, resumes with other settings, config-only folders, concurrent runs,
corrupt last lines, lost hidden-state chunks, --retry_failed, bad flags, exit codes and shards.

Each case asserts the one clear line and that no finished record is lost or duplicated
(records are counted by id). Most cases drive the one harness (common.harness) with a fake
benchmark; the rest run the real stages on the tiny pair.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.cli import run_cli
from common.errors import DataError
from common.harness import CPU_4BIT_NOTICE, CPU_NOTICE, Benchmark, RunSettings, exit_code, run_benchmark
from common.results import RECORDS_FILE, RunFolder, RunFolderError, append_jsonl, read_jsonl
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)

SETTINGS = {"dataset_dir": "/data/a", "split": "test", "max_new_tokens": 12, "gamma": 3, "quant": "fp32",
            "eventgpt_path": "/m/egpt", "videollava_path": "/m/vl", "drafter": "eventgpt", "max_questions": 1,
            "max_samples": 4, "event_source": "events", "num_chunks": 1, "chunk_idx": 0}
OTHER = {"dataset_dir": "/data/b", "split": "train", "max_new_tokens": 20, "gamma": 5, "quant": "4bit",
         "eventgpt_path": "/m/egpt2", "videollava_path": "/m/vl2", "drafter": "token_adapter", "max_questions": 10,
         "max_samples": 3, "event_source": "images"}


def samples(n: int = 4) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"s{i}", split="test", question=f"q{i}") for i in range(n)]


class FakeBench(Benchmark):
    """Records {id, value}; ``fail`` maps an id to the exception it raises."""

    def __init__(self, fail: dict | None = None):
        self.fail = fail or {}
        self.calls: list[str] = []

    def process(self, sample, unit, done):
        self.calls.append(sample.id)
        if sample.id in self.fail:
            raise self.fail[sample.id]
        return {"id": sample.id, "split": sample.split, "query": sample.question, "value": int(sample.id[1:])}

    def statistics(self, records):
        ok = [r for r in records if "error" not in r]
        return {"num_samples": len(ok), "num_failed": len(records) - len(ok), "total": sum(r["value"] for r in ok)}

    def render(self, stats, records, run):
        return f"# fake: {run.path.name}\n\nSamples: {stats['num_samples']}\n"


def settings(tmp_path: Path, **kw) -> RunSettings:
    base = dict(stage="fake", task_name="t", settings=dict(SETTINGS), output_dir=str(tmp_path), warmup_steps=0,
                device="cuda")
    base.update(kw)
    return RunSettings(**base)


def run(tmp_path: Path, bench: FakeBench, n: int = 4, **kw) -> dict:
    return run_benchmark(settings(tmp_path, **kw), samples(n), lambda: bench)


def ids_in(run_dir: str | Path) -> Counter:
    return Counter(r["id"] for r in read_jsonl(Path(run_dir) / RECORDS_FILE))


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------- kills and resume

def test_keyboard_interrupt_mid_run_is_not_swallowed_and_resume_loses_nothing(tmp_path):
    first = FakeBench(fail={"s2": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, first)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert ids_in(folder) == Counter({"s0": 1, "s1": 1}) and not (folder / "DONE").exists()
    second = FakeBench()
    out = run(tmp_path, second)
    assert out["run_dir"] == str(folder) and second.calls == ["s2", "s3"]  # finished samples not recomputed
    assert ids_in(folder) == Counter({f"s{i}": 1 for i in range(4)})
    assert out["statistics"] == {"num_samples": 4, "num_failed": 0, "total": 6, "torch_threads": None,
                                 "device": "cuda"}


@pytest.mark.parametrize("newline", [False, True], ids=["no_newline", "with_newline"])
def test_corrupt_last_record_line_is_dropped_and_that_sample_recomputed(tmp_path, newline):
    out = run(tmp_path, FakeBench(), n=2)
    folder = Path(out["run_dir"])
    (folder / "DONE").unlink()  # as if killed while writing the next record
    with open(folder / RECORDS_FILE, "a") as f:
        f.write('{"id": "s2", "value": 2, "tr' + ("\n" if newline else ""))
    with pytest.warns(UserWarning, match="truncated or corrupt last line"):
        again = run(tmp_path, FakeBench(), n=4)
    assert again["run_dir"] == out["run_dir"]
    assert ids_in(folder) == Counter({f"s{i}": 1 for i in range(4)})
    assert again["statistics"]["total"] == 6


def test_append_after_a_corrupt_last_line_with_newline_keeps_the_file_readable(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "x": [1, 2\n')
    with pytest.warns(UserWarning, match="corrupt"):
        append_jsonl(path, {"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "c"]


@pytest.mark.parametrize("key", sorted(OTHER))
def test_resume_with_another_setting_is_refused_in_one_line(tmp_path, key):
    first = FakeBench(fail={"s1": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, first)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    config_before = (folder / "config.json").read_bytes()
    records_before = (folder / RECORDS_FILE).read_bytes()
    changed = settings(tmp_path, settings={**SETTINGS, key: OTHER[key]})
    with pytest.raises(RunFolderError) as exc:
        run_benchmark(changed, samples(), FakeBench)
    line = one_line(exc)
    assert f"{key} {SETTINGS[key]!r} -> {OTHER[key]!r}" in line and "--no_resume" in line and "--task_name" in line
    assert (folder / "config.json").read_bytes() == config_before  # config.json not overwritten
    assert (folder / RECORDS_FILE).read_bytes() == records_before
    assert ids_in(folder) == Counter({"s0": 1})


def test_output_flags_do_not_block_a_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, FakeBench(fail={"s1": KeyboardInterrupt()}))
    out = run(tmp_path, FakeBench(), warmup_steps=3, desc="other progress label")
    assert ids_in(out["run_dir"]) == Counter({f"s{i}": 1 for i in range(4)})


def test_config_only_folder_is_reused_when_settings_match_and_left_alone_otherwise(tmp_path):
    failed_start = RunFolder.create("fake", "t", tmp_path)
    failed_start.write_config({}, [], settings={**SETTINGS, "gamma": 9})  # a start that died before any record
    out = run(tmp_path, FakeBench())
    assert out["run_dir"] != str(failed_start.path)  # other settings: a new folder
    assert not (failed_start.path / RECORDS_FILE).exists()
    matching = RunFolder.create("fake", "t2", tmp_path)
    matching.write_config({}, [], settings=SETTINGS)
    again = run(tmp_path, FakeBench(), task_name="t2")
    assert again["run_dir"] == str(matching.path)
    assert ids_in(again["run_dir"]) == Counter({f"s{i}": 1 for i in range(4)})


def test_a_second_run_at_once_is_refused_and_duplicates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, FakeBench(fail={"s2": KeyboardInterrupt()}))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with RunFolder(folder).lock():  # the first run is still writing
        with pytest.raises(RunFolderError) as exc:
            run(tmp_path, FakeBench())
    assert "another run" in one_line(exc) and str(folder) in str(exc.value)
    assert ids_in(folder) == Counter({"s0": 1, "s1": 1})
    assert ids_in(run(tmp_path, FakeBench())["run_dir"]) == Counter({f"s{i}": 1 for i in range(4)})


def test_shards_with_one_task_name_get_their_own_folders(tmp_path):
    outs = [run(tmp_path, FakeBench(), num_chunks=2, chunk_idx=k,
                settings={**SETTINGS, "num_chunks": 2, "chunk_idx": k}) for k in range(2)]
    assert outs[0]["run_dir"] != outs[1]["run_dir"]
    assert all(f"chunk{k}of2" in Path(o["run_dir"]).name for k, o in enumerate(outs))
    for o in outs:
        assert ids_in(o["run_dir"]) == Counter({f"s{i}": 1 for i in range(4)})


# ----------------------------------------------------------------------------- per-sample failures

@pytest.mark.parametrize("error", [MemoryError("cannot allocate 2.7 TiB"), ValueError("width 1000000"),
                                   RuntimeError("bad frame"), DataError("clip.npz: corrupt; re-export it")],
                         ids=["MemoryError", "ValueError", "RuntimeError", "DataError"])
def test_any_per_sample_failure_is_recorded_and_the_run_goes_on(tmp_path, error):
    out = run(tmp_path, FakeBench(fail={"s1": error}))
    records = read_jsonl(Path(out["run_dir"]) / RECORDS_FILE)
    assert Counter(r["id"] for r in records) == Counter({f"s{i}": 1 for i in range(4)})
    (bad,) = [r for r in records if "error" in r]
    assert bad["id"] == "s1" and str(error) in bad["error"] and "\n" not in bad["error"]
    assert out["statistics"]["num_samples"] == 3 and out["statistics"]["num_failed"] == 1


def test_retry_failed_replaces_failed_records_without_duplicates(tmp_path):
    base = run(tmp_path, FakeBench(fail={"s2": ValueError("bad file")}))
    assert [r["id"] for r in read_jsonl(Path(base["run_dir"]) / RECORDS_FILE) if "error" in r] == ["s2"]
    good = FakeBench()
    done = run(tmp_path, good, retry_failed=True)  # the finished run is continued, only its failed sample rerun
    assert done["run_dir"] == base["run_dir"] and good.calls == ["s2"]
    records = read_jsonl(Path(done["run_dir"]) / RECORDS_FILE)
    assert Counter(r["id"] for r in records) == Counter({f"s{i}": 1 for i in range(4)})
    assert not any("error" in r for r in records) and done["statistics"] == {
        "num_samples": 4, "num_failed": 0, "total": 6, "torch_threads": None, "device": "cuda"}


def test_without_retry_failed_a_resume_skips_failed_samples(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, FakeBench(fail={"s0": ValueError("bad file"), "s2": KeyboardInterrupt()}))
    again = FakeBench()
    out = run(tmp_path, again)
    assert again.calls == ["s2", "s3"] and out["statistics"]["num_failed"] == 1
    assert ids_in(out["run_dir"]) == Counter({f"s{i}": 1 for i in range(4)})


# ----------------------------------------------------------------------------- exit codes, notices

def test_exit_code_is_one_when_every_sample_failed_and_two_for_a_refusal(tmp_path, capsys):
    def all_failed():
        return run(tmp_path, FakeBench(fail={f"s{i}": ValueError("bad") for i in range(4)}), task_name="f")

    with pytest.raises(SystemExit) as exc:
        run_cli(lambda argv: all_failed(), argv=[], exit_code=exit_code)
    assert exc.value.code == 1
    assert run_cli(lambda argv: run(tmp_path, FakeBench(), task_name="g"), argv=[], exit_code=exit_code) == 0

    def refused(argv):
        raise RunFolderError("x: resume refused, its records were made with other settings (gamma 3 -> 5)")

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(refused, argv=[], exit_code=exit_code)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "gamma 3 -> 5" in err


@pytest.mark.parametrize("quant", [None, "4bit"])
def test_cpu_timings_are_labelled_at_the_top_of_results_md(tmp_path, quant):
    out = run(tmp_path, FakeBench(), device="cpu", quant=quant, torch_threads=1)
    lines = (Path(out["run_dir"]) / "RESULTS.md").read_text().splitlines()
    assert lines[0].startswith("# fake") and CPU_NOTICE in lines[2]
    assert (CPU_4BIT_NOTICE in "\n".join(lines[:5])) == (quant == "4bit")
    config = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert config["args"]["torch_threads"] == 1 and out["statistics"]["torch_threads"] == 1


@pytest.mark.parametrize("module,flag,value", [
    ("benchmark_inference.benchmark_inference", "--gamma", "-1"),
    ("benchmark_inference.benchmark_inference", "--max_new_tokens", "-5"),
    ("benchmark_inference.benchmark_inference", "--max_samples", "-2"),
    ("benchmark_parallel_prefill.benchmark_parallel_prefill", "--gamma", "0"),
    ("benchmark_parallel_prefill.compare_drafters", "--max_new_tokens", "0"),
    ("token_alignment.extract_tokens", "--max_new_tokens", "-1"),
    ("feature_alignment.extract_hidden_states", "--max_samples", "-1"),
])
def test_negative_flags_are_refused_by_argparse_in_one_line(module, flag, value, capsys):
    import importlib

    parser = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([f"{flag}={value}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and flag in err[-1] and ">=" in err[-1]


# ----------------------------------------------------------------------------- the real stages (tiny pair)

def _bench_argv(models, dataset, out, *extra):
    return ["--dataset_dir", str(dataset), "--eventgpt_path", str(models / "eventgpt"),
            "--videollava_path", str(models / "videollava"), "--output_dir", str(out), "--task_name", "t",
            "--max_new_tokens", "8", "--gamma", "3", "--warmup_steps", "0", "--device", "cpu", *extra]


def _none_pattern(stats: dict) -> dict:
    return {k: v is None for k, v in stats.items() if not isinstance(v, (dict, list))}


def test_resumed_parallel_run_reports_the_same_statistics_as_an_uninterrupted_one(
        tiny_models_dir, tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    from benchmark_parallel_prefill import benchmark_parallel_prefill as bp

    whole = bp.main(_bench_argv(tiny_models_dir, tiny_dataset, tmp_path / "whole", "--max_samples", "2"))["statistics"]
    real, calls = bp.process_sample, []

    def killed_on_second(*a):
        calls.append(a[2].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(bp, "process_sample", killed_on_second)
    argv = _bench_argv(tiny_models_dir, tiny_dataset, tmp_path / "killed", "--max_samples", "2")
    with pytest.raises(KeyboardInterrupt):
        bp.main(argv)
    monkeypatch.setattr(bp, "process_sample", real)
    resumed = bp.main(argv)
    stats = resumed["statistics"]
    assert stats["cost_ratio_c"] is not None and stats["speedup_predicted"] is not None
    assert _none_pattern(stats) == _none_pattern(whole)
    for key in ("num_samples", "num_failed", "lossless_rate", "gamma", "drafter"):
        assert stats[key] == whole[key], key
    assert ids_in(resumed["run_dir"]) == Counter({r: 1 for r in ids_in(resumed["run_dir"])}) and \
        sum(ids_in(resumed["run_dir"]).values()) == 2
    # nothing left to do (killed after the last record): c comes from the records, unchanged
    (Path(resumed["run_dir"]) / "DONE").unlink()
    again = bp.main(argv)["statistics"]
    assert again["cost_ratio_c"] == stats["cost_ratio_c"] and again["speedup_predicted"] == stats["speedup_predicted"]


def test_max_new_tokens_beyond_the_context_is_refused_in_one_line(tiny_models_dir, tiny_dataset, tmp_path):  # noqa: F811
    from benchmark_inference import benchmark_inference as bi

    with pytest.raises(DataError) as exc:
        bi.main(_bench_argv(tiny_models_dir, tiny_dataset, tmp_path, "--max_samples", "1")
                + ["--max_new_tokens", "100000"])
    assert "--max_new_tokens 100000" in one_line(exc) and "context" in str(exc.value)


def _bad_copy(dataset: Path, to: Path) -> tuple[Path, str]:
    """A copy of ``dataset`` whose first clip's video is truncated (and its frames removed)."""
    import shutil

    from common.results import read_json

    shutil.copytree(dataset, to)
    index = read_json(to / "EventGPT_Instruction_Subset.json")
    mp4 = to / index[0]["mp4_data"]
    mp4.write_bytes(mp4.read_bytes()[:200])
    shutil.rmtree(to / index[0]["video_data"], ignore_errors=True)
    return to, mp4.name


def test_extract_tokens_counts_a_failed_sample_once_and_refuses_another_answer_cap(
        tiny_models_dir, tiny_dataset, tmp_path, capsys):  # noqa: F811
    from token_alignment import extract_tokens

    data, _ = _bad_copy(tiny_dataset, tmp_path / "data")
    out = tmp_path / "tokens.jsonl"
    argv = ["--dataset_dir", str(data), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
            "--videollava_path", str(tiny_models_dir / "videollava"), "--device", "cpu", "--max_samples", "2",
            "--max_new_tokens", "4", "--output_file", str(out)]
    with pytest.warns(UserWarning, match="skipping"):
        summary = extract_tokens.main(argv)
    printed = capsys.readouterr().out
    assert "skipped 1 sample with bad files" in printed and summary["num_failed"] == 1
    # sequential mode writes one line per part until compacted: 3 for the good sample, the EventGPT
    # answer (it reads the events, not the broken video) for the bad one; no part twice
    parts = Counter(r["id"] for r in read_jsonl(out))
    assert summary["num_complete"] == 1 and sorted(parts.values()) == [1, 3]
    with pytest.raises(SystemExit) as exc:
        extract_tokens.main(argv[:-4] + ["--max_new_tokens", "6", "--output_file", str(out)])
    assert "max_new_tokens [4] -> 6" in one_line(exc) and "--output_file" in str(exc.value)


def _extract_argv(dataset, out):
    return ["--dataset_dir", str(dataset), "--split", "train", "--output_dir", str(out), "--device", "cpu",
            "--max_new_tokens", "4", "--chunk_size", "2", "--batch_size", "2", "--layers=-1"]


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_lost_hidden_state_chunk_is_extracted_again(fa_dataset, models, tmp_path, damage):
    from feature_alignment import extract_hidden_states as extract
    from feature_alignment.hidden_store import HiddenStore, extraction_complete, load_index

    out = tmp_path / "train"
    first = extract.main(_extract_argv(fa_dataset, out), models=models)
    assert first["complete"] and first["num_chunks"] == 2
    entries = load_index(out)["chunks"]
    assert all(len(c["sha256"]) == 64 and c["bytes"] == (out / c["file"]).stat().st_size for c in entries)
    order = HiddenStore.open(out).sample_ids()
    chunk = out / entries[0]["file"]
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:100])
    else:
        chunk.unlink()
    assert not extraction_complete(out)  # the index alone no longer vouches for the folder
    again = extract.main(_extract_argv(fa_dataset, out), models=models)
    assert again["complete"] and again["new_samples"] == entries[0]["num_samples"] and again["num_samples"] == 4
    store = HiddenStore.open(out)
    assert store.sample_ids() == order and Counter(store.sample_ids()).most_common(1)[0][1] == 1
    assert extraction_complete(out)


def test_hidden_state_retry_failed_and_exit_status(fa_dataset, models, tmp_path):
    import shutil
    import signal as _signal

    from common.results import read_json
    from feature_alignment import extract_hidden_states as extract

    data, _ = _bad_copy(fa_dataset, tmp_path / "data")
    out = tmp_path / "train"
    summary = extract.main(_extract_argv(data, out), models=models)
    assert summary["failed"] == 1 and summary["num_samples"] == 3 and extract.exit_status(summary) == 0
    assert extract.main(_extract_argv(data, out), models=models)["new_samples"] == 0  # failed: skipped
    entry = read_json(fa_dataset / "EventGPT_Instruction_Subset.json")[0]
    shutil.copy(fa_dataset / entry["mp4_data"], data / entry["mp4_data"])  # the file is fixed
    if (fa_dataset / entry["video_data"]).is_dir():
        shutil.copytree(fa_dataset / entry["video_data"], data / entry["video_data"], dirs_exist_ok=True)
    fixed = extract.main(_extract_argv(data, out) + ["--retry_failed"], models=models)
    assert fixed["failed"] == 0 and fixed["num_samples"] == 4 and fixed["new_samples"] == 1 and fixed["complete"]
    assert extract.exit_status({"signal": _signal.SIGINT}) == 130
    assert extract.exit_status({"planned_samples": 2, "num_samples": 0, "failed": 2}) == 1


def test_a_second_extraction_into_one_folder_is_refused_in_one_line(fa_dataset, models, tmp_path):
    from common.results import file_lock
    from feature_alignment import extract_hidden_states as extract
    from feature_alignment.hidden_store import LOCK_FILE, extraction_complete

    out = tmp_path / "train"
    assert extract.main(_extract_argv(fa_dataset, out), models=models)["complete"]
    assert not (out / LOCK_FILE).exists() and extraction_complete(out)
    with file_lock(out / LOCK_FILE, wait=False):  # the first extraction is still running
        assert not extraction_complete(out)
        with pytest.raises(RunFolderError) as exc:
            extract.main(_extract_argv(fa_dataset, out), models=models)
    assert "another run" in one_line(exc) and "--output_dir" in str(exc.value)
    (out / LOCK_FILE).write_text("12345\n")  # a file left by a killed run is not a held lock
    assert extraction_complete(out)
    assert extract.main(_extract_argv(fa_dataset, out), models=models)["new_samples"] == 0
