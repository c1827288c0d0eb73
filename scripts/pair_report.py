"""The models/README.md section of a retrained pair: issue 14's checks and the measured tables.

    python -m scripts.pair_report --results RUN_DIR/results.json --models_dir OUT/pair/models > section.md

Reads an ``evaluate_pair`` results.json (a ``--long_answers`` dataset, ``--max_questions 51``) and the pair
folder (its ``train_tiny_pair.json`` and file sizes) and prints markdown: one line per check (benchmark
question answered in >= 40 target tokens on average; target ahead of draft and blind; draft ahead of
blind on motion questions; models/ < 50 MB), token agreement on the long answers, then evaluate_pair's
tables. ``scripts/retrain_pair_gpu.sh`` writes it as OUT/pair/README_section.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BENCHMARK_QUESTION = "What are the key elements in this scene?"
SIZE_LIMIT_MB = 50.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.pair_report", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="results.json of an evaluate_pair run")
    p.add_argument("--models_dir", required=True, help="the pair folder (eventgpt/, videollava/, train_tiny_pair.json)")
    return p


def folder_megabytes(folder: Path) -> float:
    """Total size of the files under ``folder`` in MB (1e6 bytes)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def long_token_agreement(long_questions: dict[str, Any]) -> float | None:
    """Token agreement over every long-answer question's target positions together."""
    positions = same = 0.0
    for block in long_questions.values():
        n_pos = (block["mean_tokens"]["videollava"] or 0.0) * block["samples"]
        positions += n_pos
        same += (block["token_agreement"] or 0.0) * n_pos
    return same / positions if positions else None


def checks(stats: dict[str, Any], megabytes: float) -> list[tuple[str, bool | None, str]]:
    """(check, passed (None: not measured), measured values) per issue-14 criterion."""
    overall, motion = stats["overall"], stats["groups"].get("motion")
    bench = stats.get("long_questions", {}).get(BENCHMARK_QUESTION)
    out: list[tuple[str, bool | None, str]] = []
    if bench:
        n = bench["mean_tokens"]["videollava"]
        out.append((f"target's mean answer to {BENCHMARK_QUESTION!r} >= 40 tokens", n >= 40,
                    f"{n:.1f} tokens (draft {bench['mean_tokens']['eventgpt']:.1f}; n={bench['samples']})"))
    else:
        out.append((f"target's mean answer to {BENCHMARK_QUESTION!r} >= 40 tokens", None, "question not scored"))
    vl, eg, bl = overall["videollava"], overall["eventgpt"], overall["blind"]
    beats = vl["exact"] > eg["exact"] and vl["f1"] > eg["f1"] and (bl is None or (vl["exact"] > bl["exact"]
                                                                                   and vl["f1"] > bl["f1"]))
    out.append(("target beats draft and blind (exact and F1, all questions)", beats,
                f"exact {vl['exact']:.3f} / {eg['exact']:.3f} / {_f(bl, 'exact')}, "
                f"F1 {vl['f1']:.3f} / {eg['f1']:.3f} / {_f(bl, 'f1')} (target / draft / blind)"))
    if motion and motion["blind"]:
        me, mb = motion["eventgpt"], motion["blind"]
        out.append(("draft beats blind on motion questions (exact and F1)", me["exact"] > mb["exact"] and me["f1"] > mb["f1"],
                    f"exact {me['exact']:.3f} vs {mb['exact']:.3f}, F1 {me['f1']:.3f} vs {mb['f1']:.3f}, "
                    f"key {me['key']:.3f} vs {mb['key']:.3f} (n={motion['samples']})"))
    out.append((f"models/ < {SIZE_LIMIT_MB:.0f} MB", megabytes < SIZE_LIMIT_MB, f"{megabytes:.1f} MB"))
    return out


def _f(block: dict | None, key: str) -> str:
    return "-" if block is None else f"{block[key]:.3f}"


def report(stats: dict[str, Any], train: dict[str, Any] | None, megabytes: float) -> str:
    """The README section as markdown."""
    from scripts.evaluate_pair import markdown

    lines = ["## Measured now (long-answer retrain)", ""]
    if train:
        lines += [f"Trained: `{train.get('command', '')}` on {train.get('device', '?')}: {train.get('epochs_done')} "
                  f"epochs, {train.get('steps')} steps, {train.get('train_dataset', {}).get('clips')} clips.", ""]
    lines += ["| check | result | measured |", "|---|---|---|"]
    for name, passed, value in checks(stats, megabytes):
        mark = "not measured" if passed is None else ("yes" if passed else "**no**")
        lines.append(f"| {name} | {mark} | {value} |")
    agreement = long_token_agreement(stats.get("long_questions", {}))
    if agreement is not None:
        lines += ["", f"Token agreement on the long answers (all long-answer questions): {agreement:.3f}."]
    return "\n".join(lines + ["", markdown(stats)])


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the section."""
    from common.errors import DataError

    args = build_parser().parse_args(argv)
    path, models = Path(args.results), Path(args.models_dir)
    try:
        stats = json.loads(path.read_text())["statistics"]
        stats["overall"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not an evaluate_pair results.json with statistics ({exc}); pass a finished run's") from exc
    summary = models / "train_tiny_pair.json"
    train = json.loads(summary.read_text()) if summary.is_file() else None
    text = report(stats, train, folder_megabytes(models))
    print(text)
    return text


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
