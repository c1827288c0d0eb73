"""The newcomer's path: outputs under results/, honest demo summary, one-line errors, quiet progress, INDEX.md."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import run_cli
from common.errors import DataError
from common.progress import _LogBar, progress, progress_bar, progress_line
from common.run_index import describe_run, find_runs, key_figures, results_root_of, update_index

REPO = Path(__file__).resolve().parent.parent
STAGE_FOLDERS = ("benchmark_inference", "benchmark_parallel_prefill", "token_alignment", "feature_alignment")


# --------------------------------------------------------------------------- outputs under results/


def test_no_stage_folder_hides_outputs_with_a_gitignore():
    assert [f for f in STAGE_FOLDERS if (REPO / f / ".gitignore").exists()] == []


def test_no_readme_or_workflow_sends_outputs_into_source_folders():
    import re

    old = re.compile(r"(?<![\w/])(token_alignment/task\b|feature_alignment/hidden/|feature_alignment/tasks\b|"
                     r"feature_alignment/eagle\b|token_alignment/logs|feature_alignment/logs|"
                     r"benchmark_parallel_prefill/logs)|nohup [^\n]*> /dev/null")
    hits = []
    for path in [REPO / "README.md", *REPO.glob("*/README.md"), *REPO.glob("*/*.sh")]:
        text = path.read_text()
        for m in old.finditer(text):
            around = text[max(0, m.start() - 200):m.end() + 200]
            if "older versions" not in around and "deprecat" not in around:  # the notes about old places
                hits.append((path.relative_to(REPO).as_posix(), m.group(0)))
    assert hits == []


def test_default_locations():
    from token_alignment.drafter import DEFAULT_ROOT

    from feature_alignment.extract_hidden_states import DEFAULT_OUTPUT_ROOT
    from feature_alignment.train_hidden_adapter import DEFAULT_TRAIN_DIR
    from token_alignment.train_and_evaluate import TASK_ROOT

    assert TASK_ROOT.as_posix() == "results/token_alignment"
    assert DEFAULT_ROOT == "results/token_alignment"
    assert DEFAULT_OUTPUT_ROOT.as_posix() == "data/feature_alignment/hidden"
    assert DEFAULT_TRAIN_DIR.as_posix() == "data/feature_alignment/hidden/train"


def test_legacy_location_found_with_one_deprecation_line(tmp_path, monkeypatch, caplog):
    from common import locations

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, "REPO_ROOT", tmp_path)
    (tmp_path / "old" / "train").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="common.locations"):
        first = locations.find_with_legacy("new/train", "old/train", "hidden states")
        second = locations.find_with_legacy("new/train", "old/train", "hidden states")
    assert first == second == Path("old/train")
    assert len([r for r in caplog.records if "deprecated location" in r.getMessage()]) == 1
    (tmp_path / "new" / "train").mkdir(parents=True)
    assert locations.find_with_legacy("new/train", "old/train", "hidden states") == Path("new/train")
    assert locations.find_with_legacy("none/a", "none/b", "x") == Path("none/a")


def test_find_latest_adapter_reads_the_legacy_task_folder(tmp_path, monkeypatch):
    from common import locations
    from token_alignment import drafter

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locations, "REPO_ROOT", tmp_path)  # no results/ of the checkout in the way
    run = tmp_path / "token_alignment" / "task" / "old_20260101_000000"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text("{}")
    (run / "checkpoint" / "model.safetensors").write_bytes(b"x")
    (run / "DONE").write_text("x")
    assert drafter.find_latest_adapter() == Path("token_alignment/task/old_20260101_000000/checkpoint")


# --------------------------------------------------------------------------- errors and progress


def _raise(exc):
    def main(argv):
        raise exc
    return main


def test_expected_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(_raise(DataError("data/x/index.json: missing; pass --dataset_dir DIR\nsecond line")), [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: data/x/index.json: missing; pass --dataset_dir DIR "
                           "(run with --debug for the traceback)")
    assert "Traceback" not in err


def test_debug_shows_the_traceback_and_is_not_passed_on():
    seen = []

    def main(argv):
        seen.append(list(argv))
        raise DataError("bad")
    with pytest.raises(DataError):
        run_cli(main, ["--x", "1", "--debug"])
    assert seen == [["--x", "1"]]


def test_missing_file_names_the_file(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(_raise(FileNotFoundError(2, "No such file or directory", "ckpt/config.json")), [])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ckpt/config.json: No such file or directory")


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raise(ZeroDivisionError("bug")), [])


def test_cli_missing_dataset_is_one_line_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.evaluate_pair", "--dataset_dir", str(tmp_path / "nope"),
                           "--device", "cpu", "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and "nope" in lines[-1]


def test_progress_logs_a_line_every_n_seconds_when_not_a_terminal():
    ticks = iter([0.0, 1.0, 2.5, 3.0, 5.5, 6.0, 6.0])
    stream = io.StringIO()
    bar = _LogBar(total=5, desc="extract", unit="sample", initial=0, every_s=2.0, stream=stream,
                  clock=lambda: next(ticks))
    for _ in range(5):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["extract: 2/5 sample (0.80 sample/s, 2 s elapsed, ~4 s left)",
                     "extract: 4/5 sample (0.73 sample/s, 6 s elapsed, ~1 s left)",
                     "extract: 5/5 sample (0.83 sample/s, 6 s elapsed) done"]


def test_progress_short_loop_is_silent_and_yields_everything():
    stream = io.StringIO()
    assert list(progress(range(4), "x", "it", stream=stream, every_s=60)) == [0, 1, 2, 3]
    assert stream.getvalue() == ""
    bar = progress_bar(3, "y", "it", stream=stream, disable=True)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""
    assert progress_line("d", 3, None, "it", 2.0) == "d: 3 it (1.50 it/s, 2 s elapsed)"


def test_epoch_line_is_short():
    from feature_alignment.train_hidden_adapter import epoch_line

    row = {"epoch": 3, "train_loss": 0.51234, "train_cos": 0.8, "train_top1": 0.4, "train_acc@0.90": 0.1,
           "val_loss": 0.49876, "val_cos": 0.81234, "val_top1": 0.41, "val_rel_mse": 0.3, "seconds": 2.13}
    line = epoch_line(row, "val_loss", best=True)
    assert line == ("epoch 3: train loss 0.5123 cos 0.8 top1 0.4 | val loss 0.4988 cos 0.8123 top1 0.41 | 2.1 s"
                    "  * best val_loss")
    assert len(line) < 120


def test_quiet_silences_transformers_progress_bars():
    from transformers.utils import logging as hf_logging

    from common.quiet import quiet_third_party

    quiet_third_party()
    assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == hf_logging.ERROR
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()


# --------------------------------------------------------------------------- INDEX.md


def _run(root: Path, rel: str, stats: dict, samples: int | None = None, done: bool = True) -> Path:
    run = root / rel
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    body = {"statistics": stats}
    if samples is not None:
        body["samples"] = [{"id": str(i)} for i in range(samples)]
    (run / "results.json").write_text(json.dumps(body))
    (run / "RESULTS.md").write_text("# r\n")
    if done:
        (run / "DONE").write_text("x")
    return run


def test_index_lists_each_run_with_values(tmp_path):
    root = tmp_path / "results"
    _run(root, "benchmark_parallel_prefill/full_1s_20261130_101500",
         {"num_samples": 100, "speedup_measured": 1.2345, "acceptance_rate_avg": 0.4519, "lossless_rate": 1.0})
    _run(root, "token_alignment/tokens_10q_20261129_080000",
         {"test_teacher_forced": {"num_samples": 40, "adapter_top1": 0.5469},
          "live": {"adapter": {"acceptance_rate": 0.2667}}}, samples=3)
    _run(root, "benchmark_inference/killed_20261130_120000", {}, done=False)
    (root / "benchmark_inference" / "killed_20261130_120000" / "results.json").unlink()
    (root / "logs").mkdir()
    text = update_index(root).read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| 2026")]
    assert rows == [
        "| 2026-11-30 12:00 | benchmark_inference | killed | unfinished | - | - | "
        "[benchmark_inference/killed_20261130_120000/RESULTS.md](benchmark_inference/killed_20261130_120000/RESULTS.md) |",
        "| 2026-11-30 10:15 | benchmark_parallel_prefill | full_1s | done | 100 | speedup 1.23x, acceptance 0.452, "
        "lossless 1.00 | [benchmark_parallel_prefill/full_1s_20261130_101500/RESULTS.md]"
        "(benchmark_parallel_prefill/full_1s_20261130_101500/RESULTS.md) |",
        "| 2026-11-29 08:00 | token_alignment | tokens_10q | done | 40 | TF top-1 0.547, live acceptance 0.267 | "
        "[token_alignment/tokens_10q_20261129_080000/RESULTS.md](token_alignment/tokens_10q_20261129_080000/RESULTS.md) |",
    ]


def test_index_helpers(tmp_path):
    root = tmp_path / "results"
    run = _run(root, "demo/benchmark_inference/demo_20261130_144659", {"sd_speedup_measured": 0.94})
    assert find_runs(root) == [run]
    entry = describe_run(run, root)
    assert (entry.stage, entry.task, entry.date, entry.n) == ("demo/benchmark_inference", "demo",
                                                               "2026-11-30 14:46", None)
    assert key_figures({"test": {"cos": 0.19582, "top1": 0.40625}}) == "test cos 0.196, test top-1 0.406"
    assert results_root_of(run) == root.resolve()
    assert results_root_of(tmp_path / "x" / "stage" / "run") == (tmp_path / "x").resolve()
    assert results_root_of(tmp_path / "y", fallback=tmp_path / "y") == tmp_path / "y"
    assert update_index(tmp_path / "missing") is None


# --------------------------------------------------------------------------- demo summary


def test_demo_summary_compares_with_the_strongest_baseline():
    from scripts.demo_summary import drafter_rows

    token = {"test_teacher_forced": {"baseline_position_match": 0.422, "baseline_draft_next_match": 0.797,
                                     "adapter_top1": 0.547, "num_positions": 64, "num_samples": 6},
             "live": {"num_samples": 3,
                      "raw": {"acceptance_rate": 0.738, "mean_accepted_length": 3.21, "num_drafted": 42},
                      "adapter": {"acceptance_rate": 0.267, "mean_accepted_length": 1.8, "num_drafted": 75},
                      "aligned_metrics": {"raw_acceptance_rate_std": 0.157, "aligned_acceptance_rate_std": 0.241}}}
    feature = {"test": {"top1": 0.406, "positions": 64}}
    rows = drafter_rows(token, feature)
    tf, live = rows[0], rows[1]
    assert (tf["raw EventGPT drafting"], tf["learned"], tf["verdict"]) == ("0.797", "0.547", "WORSE than raw")
    assert (live["raw EventGPT drafting"], live["learned"], live["verdict"]) == ("0.738", "0.267", "WORSE than raw")
    assert live["n"] == "3 samples (42 vs 75 drafted)"
    assert live["spread (per-sample std: raw / learned)"] == "0.157 / 0.241"
    assert rows[3]["raw EventGPT drafting"] == "0.797" and rows[3]["learned"] == "0.406"
    assert all("0.422" not in str(r.values()) for r in rows)  # the weak index-aligned baseline is not the yardstick


def test_demo_prediction_shows_the_range_of_c():
    from scripts.demo_summary import cost_ratios, leviathan, predicted_speedup

    records = [{"egpt_decode_ms_per_token": 2.0, "videollava_decode_ms_per_token": 10.0},
               {"egpt_decode_ms_per_token": 3.0, "videollava_decode_ms_per_token": 10.0},
               {"egpt_decode_ms_per_token": 5.0, "videollava_decode_ms_per_token": 10.0}]
    cs = cost_ratios(records)
    assert cs == pytest.approx([0.2, 0.3, 0.5])
    pred = predicted_speedup(0.8, 3, cs)
    assert pred["c_median"] == pytest.approx(0.3)
    assert pred["median"] == pytest.approx((1 - 0.8 ** 4) / (0.2 * 1.9))
    assert pred["low"] == pytest.approx(leviathan(0.8, 3, 0.5)) and pred["high"] == pytest.approx(leviathan(0.8, 3, 0.2))
    assert pred["low"] < pred["median"] < pred["high"]
    assert predicted_speedup(None, 3, cs)["median"] is None


def test_demo_summary_text_has_caveat_sizes_spread_and_definition():
    from types import SimpleNamespace

    from scripts.demo_summary import inference_rows, render_summary, run_sizes

    records = [{"id": str(i), "videollava_time": 1.0, "sd_time": t, "sd_acceptance_rate": a,
                "sd_mean_accepted_length": 2.0, "acceptance_rate": 0.4, "egpt_decode_ms_per_token": 2.5,
                "videollava_decode_ms_per_token": 7.0, "sd_identical": True, "videollava_num_tokens": 20}
               for i, (t, a) in enumerate([(0.5, 0.6), (1.0, 0.8)])]
    stats = {"sd_token_acceptance_probability": 0.75, "sd_acceptance_rate_avg": 0.7,
             "sd_mean_accepted_length_avg": 2.0, "acceptance_rate_avg": 0.4,
             "egpt_decode_ms_per_token_avg": 2.5, "videollava_decode_ms_per_token_avg": 7.0}
    rows = inference_rows(stats, records, gamma=3)
    by = {r["measure"]: r for r in rows}
    acc = by["speculation with raw EventGPT drafting: acceptance rate"]
    assert (acc["value"], acc["n"], acc["spread"]) == ("0.700", "2 samples", "0.700 ± 0.100 (0.600-0.800)")
    assert by["speedup measured end to end (per sample)"]["spread"] == "1.50 ± 0.50 (1.00-2.00)"
    assert by["lossless (output == the target's own)"]["value"] == "2/2"
    sizes = run_sizes(SimpleNamespace(gamma=3, max_new_tokens=30), records, None)
    assert sizes == ("Run sizes: benchmarks on 2 test samples, gamma 3, at most 30 new tokens per answer "
                     "(40 target tokens in all).")
    text = render_summary(["header"], sizes, rows, [], ["a.png"])
    assert text.index("**Read this first.**") < text.index("## Benchmarks")
    assert "CPU" in text.split("## Benchmarks")[0]
    assert "free tokens" in text and "accepted draft tokens / drafted tokens" in text


# --------------------------------------------------------------------------- read-outs


def test_evaluate_pair_blind_baseline_is_fitted_on_train_not_on_scored():
    from scripts.evaluate_pair import _blind_baseline, fit_blind_baseline

    guesses = fit_blind_baseline([("q1", "two cars"), ("q1", "two cars"), ("q1", "one car"), ("q2", "red")])
    assert guesses == {"q1": "two cars", "q2": "red"}
    scored = [{"query": "q1", "answer": "one car", "group": "scene"},
              {"query": "q3", "answer": "blue", "group": "colour"}]
    blind = _blind_baseline(scored, guesses)
    assert [b["blind_exact"] for b in blind] == [0.0, 0.0]  # fitting on the scored samples would give 1.0, 1.0


def test_stage_labels_and_wrapped_titles(tmp_path):
    from common.plots import _wrap_title, plot_bars, stage_label

    assert [stage_label(s) for s in ("stage1", "stage4", "free draft")] == ["1 data load", "4 LLM prefill",
                                                                         "free draft"]
    title = "Measured end-to-end speedup vs target alone (gamma 5; error bars: per-sample std)"
    wrapped = _wrap_title(title, 5.0)
    assert "\n" in wrapped and wrapped.replace("\n", " ") == title
    assert plot_bars({"a": 1.2, "b": 0.9}, tmp_path / "s.png", title=title, errors={"a": 0.1, "b": None}).is_file()


def test_merged_shards_render_the_single_run_readouts(tiny_models_dir, tmp_path):
    from benchmark_parallel_prefill import benchmark_parallel_prefill as bp
    from common.defaults import default_dataset_dir
    from scripts.merge_results import main as merge

    base = ["--dataset_dir", str(default_dataset_dir()), "--eventgpt_path", str(tiny_models_dir / "eventgpt"),
            "--videollava_path", str(tiny_models_dir / "videollava"), "--max_new_tokens", "4", "--gamma", "2",
            "--warmup_steps", "0", "--max_samples", "2", "--device", "cpu", "--output_dir", str(tmp_path / "runs")]
    chunks = [bp.main([*base, "--task_name", f"chunk{i}", "--num_chunks", "2", "--chunk_idx", str(i)])
              for i in range(2)]
    merged = merge([c["run_dir"] for c in chunks] + ["--output_dir", str(tmp_path / "results" / "merged")])
    out = Path(merged["run_dir"])
    single_md = (Path(chunks[0]["run_dir"]) / "RESULTS.md").read_text()
    merged_md = (out / "RESULTS.md").read_text()
    assert merged_md.startswith("# benchmark_parallel_prefill: merged_")
    assert "| lossless_rate |" in merged_md and "| lossless_rate |" in single_md
    assert "Merged from 2 run folders" in merged_md
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in Path(chunks[0]["run_dir"]).glob("*.png"))
    n = sum(c["statistics"]["num_samples"] for c in chunks)
    assert merged["num_samples"] == n == merged["statistics"]["num_samples"]
    index = (tmp_path / "results" / "INDEX.md").read_text()
    assert f"| merged | done | {n} |" in index


def test_help_needs_no_torch():
    code = ("import sys, runpy; sys.argv = [sys.argv[0], '--help']\n"
            "for m in ('token_alignment.extract_tokens', 'token_alignment.train_and_evaluate',\n"
            "          'feature_alignment.extract_hidden_states', 'feature_alignment.train_hidden_adapter',\n"
            "          'scripts.merge_results', 'scripts.evaluate_pair', 'scripts.demo',\n"
            "          'benchmark_inference.benchmark_inference', 'benchmark_parallel_prefill.benchmark_parallel_prefill',\n"
            "          'benchmark_parallel_prefill.compare_drafters'):\n"
            "    try:\n"
            "        runpy.run_module(m, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(k for k in ('torch', 'transformers', 'numpy') if k in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_adapter_level_choices_match_the_adapters():
    from feature_alignment.hidden_adapter import LEVELS

    from feature_alignment.train_hidden_adapter import ADAPTER_LEVELS

    assert ADAPTER_LEVELS == tuple(sorted(LEVELS))


def test_benchmarks_on_the_embedded_default_read_its_test_split_only(tmp_path, monkeypatch):
    """With no --dataset_dir the benchmarks take the default dataset's test split, not the train clips the
    demo adds beside it; with --dataset_dir and no --split every split is read, as before."""
    from benchmark_inference.benchmark_inference import build_parser
    from common import defaults
    from common.defaults import resolve_split
    from common.pipeline import prepare_benchmark
    from tests.data_fixtures import make_dataset

    assert resolve_split(None, None) == "test"
    assert resolve_split(None, "train") == "train"
    assert resolve_split("some/dir", None) is None
    root = tmp_path / "default"
    make_dataset(root, num_clips=2, split="test", seed=1)
    make_dataset(root, num_clips=3, split="train", seed=2)
    monkeypatch.setattr(defaults, "default_dataset_dir", lambda: root)
    argv = ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    _, samples, settings = prepare_benchmark("benchmark_inference", build_parser().parse_args(argv), argv, "t")
    assert sorted({s.split for s in samples}) == ["test"] and len(samples) == 2
    assert settings.settings["split"] == "test"
    argv += ["--dataset_dir", str(root)]
    _, samples, _ = prepare_benchmark("benchmark_inference", build_parser().parse_args(argv), argv, "t")
    assert sorted({s.split for s in samples}) == ["test", "train"] and len(samples) == 5
