"""Train every trainable drafter of a small pair cheaply: TokenAdapter, hidden adapters L1 and L5, the EAGLE head.

    python -m scripts.train_drafters --data_dir data/drafter_data --pair_dir models --output_dir results/drafters
        [--num_clips 160 --num_test 16 --max_new_tokens 128 --levels 1,5 --device auto --num_workers N
         --token_epochs 30 --hidden_epochs 40 --eagle_epochs 40]

Steps (each tool resumes or reuses what an earlier run left):

1. data in ``--data_dir``: ``train/`` (``--num_clips`` clips made with ``--long_answers``; clip i is asked
   a long-answer question and a short one in turn, so both kinds of answers are trained on) and ``test/``
   (``--num_test`` held-out clips, the TokenAdapter's report set);
2. the pair's greedy answers as token pairs (``token_alignment.extract_tokens``, train and test) and as
   aligned hidden states, layer -1 of both models (``feature_alignment.extract_hidden_states``, train),
   in ``--data_dir``/extracted (so ``--output_dir`` holds only checkpoints and reports: small to copy);
3. ``token_alignment.train_and_evaluate`` (TokenAdapter), ``feature_alignment.train_hidden_adapter``
   (``--levels``: EventGPT layer -1 -> Video-LLaVA layer -1, the state that feeds its LM head) and
   ``feature_alignment.train_eagle_head`` (Video-LLaVA's layer -1 features, one decoder layer shaped
   like the target's: what ``common.drafters.widen`` widens to the twin's decoder layer).

Training runs go to ``--data_dir``/runs; the best checkpoints (token_adapter/, L1.safetensors, L5.safetensors,
eagle_head/) and each training's RESULTS.md are copied into ``--output_dir`` (a few MB: easy to carry), with
drafters.json: the checkpoint paths and the flags that pass them on
(``scripts.widen_pair`` / ``benchmark_parallel_prefill.twin_benchmark``: ``--token_adapter P
--hidden_adapter P1,P5 --eagle_head P``). On one GPU (``--device cuda``) the defaults take a few minutes.
Measured on a busy 2-core CPU: ``--num_clips 16 --num_test 4`` took 8.5 min (extraction 0.3 samples/s per
pass, the 4-layer TokenAdapter 3 min); for ~15 min there use ``--num_clips 48 --num_test 8 --token_epochs 10
--token_d_model 128 --token_layers 2``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("scripts.train_drafters")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.train_drafters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="dataset folder (train/ and test/ are made when missing)")
    p.add_argument("--pair_dir", default=None, help="folder with eventgpt/ and videollava/ (default: the shipped pair)")
    p.add_argument("--output_dir", required=True, help="folder for extractions, checkpoints and drafters.json")
    p.add_argument("--num_clips", type=int, default=160, help="training clips, one question each (default 160)")
    p.add_argument("--num_test", type=int, default=16, help="held-out clips for the TokenAdapter report (default 16)")
    p.add_argument("--width", type=int, default=320, help="clip width (default 320)")
    p.add_argument("--height", type=int, default=240, help="clip height (default 240)")
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="answer length cap of the extractions (default 128: the long answers whole, ~110 tokens)")
    p.add_argument("--levels", default="1,5", help="hidden adapter levels, comma-separated (default 1,5)")
    p.add_argument("--token_epochs", type=int, default=30, help="TokenAdapter epochs (default 30)")
    p.add_argument("--token_d_model", type=int, default=256, help="TokenAdapter width (default 256)")
    p.add_argument("--token_layers", type=int, default=4, help="TokenAdapter layers (default 4)")
    p.add_argument("--hidden_epochs", type=int, default=40, help="hidden adapter epochs (default 40)")
    p.add_argument("--eagle_epochs", type=int, default=40, help="EAGLE head epochs (default 40)")
    p.add_argument("--batch_size", type=int, default=16, help="extraction batch (default 16)")
    p.add_argument("--device", default="auto", help="torch device (default auto)")
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1), help="data processes")
    return p


def make_data(args: argparse.Namespace) -> dict[str, Path]:
    """``train/``: long-answer clips asked long and short questions in turn; ``test/``: held-out clips."""
    from benchmark_parallel_prefill.twin_benchmark import make_question_set, short_questions
    from common.synthetic import LONG_QUESTIONS

    short = short_questions()
    mixed = [q for i in range(len(short)) for q in (LONG_QUESTIONS[i % len(LONG_QUESTIONS)], short[i])]
    root = Path(args.data_dir)
    return {split: make_question_set(root / split, num, split, seed, mixed, args.num_workers, ["--long_answers"],
                                     (args.width, args.height))
            for split, num, seed in (("train", args.num_clips, 4000), ("test", args.num_test, 4500))}


def _pair_args(args: argparse.Namespace) -> list[str]:
    from common.defaults import resolve_model_paths

    root = Path(args.pair_dir) if args.pair_dir else None
    egpt, vllava = resolve_model_paths(str(root / "eventgpt") if root else None,
                                       str(root / "videollava") if root else None)
    return ["--eventgpt_path", str(egpt), "--videollava_path", str(vllava), "--device", args.device]


def extract(args: argparse.Namespace, data: dict[str, Path], out: Path) -> dict[str, Any]:
    """Token pairs (train, test) and layer -1 hidden states (train) of the pair's greedy answers, under ``out``."""
    from feature_alignment.extract_hidden_states import main as extract_hidden
    from token_alignment.extract_tokens import main as extract_tokens

    tokens = {}
    for split, folder in data.items():
        tokens[split] = out / "tokens" / f"{split}.jsonl"
        extract_tokens(["--dataset_dir", str(folder), "--split", split, "--max_questions", "1", *_pair_args(args),
                        "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size),
                        "--output_file", str(tokens[split]), "--warmup_steps", "0"])
    hidden = out / "hidden" / "train"
    extract_hidden(["--dataset_dir", str(data["train"]), "--split", "train", "--max_questions", "1",
                    *_pair_args(args), "--output_dir", str(hidden), "--layers=-1", "--max_new_tokens",
                    str(args.max_new_tokens), "--batch_size", str(args.batch_size), "--warmup_steps", "0"])
    return {"tokens": tokens, "hidden": hidden}


def train(args: argparse.Namespace, extracted: dict[str, Any], runs: Path) -> dict[str, Any]:
    """The TokenAdapter, the hidden adapters and the EAGLE head trained in run folders under ``runs``;
    their best checkpoints and reports."""
    from feature_alignment.train_eagle_head import main as train_eagle
    from feature_alignment.train_hidden_adapter import main as train_hidden
    from token_alignment.train_and_evaluate import main as train_tokens

    tok = train_tokens(["--train_tokens", str(extracted["tokens"]["train"]), "--test_tokens",
                        str(extracted["tokens"]["test"]), "--output_dir", str(runs / "token_adapter"),
                        "--epochs", str(args.token_epochs), "--d_model", str(args.token_d_model), "--n_layers",
                        str(args.token_layers), "--live_samples", "0", "--device", args.device,
                        "--warmup_steps", "0"])
    paths: dict[str, Any] = {"token_adapter": (Path(tok["checkpoint"]), Path(tok["run_dir"]) / "RESULTS.md"),
                             "hidden_adapter": []}
    for level in [int(x) for x in args.levels.split(",") if x.strip()]:
        folder = runs / f"L{level}"
        train_hidden(["--train_dir", str(extracted["hidden"]), "--adapter_level", str(level), "--output_dir",
                      str(folder), "--epochs", str(args.hidden_epochs), "--early_stopping", "8", "--batch_size", "32",
                      "--device", args.device])
        paths["hidden_adapter"].append((folder / "best.safetensors", folder / "RESULTS.md"))
    train_eagle(["--train_dir", str(extracted["hidden"]), "--output_dir", str(runs / "eagle_head"), "--epochs",
                 str(args.eagle_epochs), "--lr", "1e-3", "--batch_size", "16", "--early_stopping", "8",
                 "--token_weight", "1.0", "--device", args.device])
    paths["eagle_head"] = (runs / "eagle_head" / "best", runs / "eagle_head" / "RESULTS.md")
    return paths


def collect(trained: dict[str, Any], out: Path) -> dict[str, Any]:
    """Copy the best checkpoints (and each training's RESULTS.md) into ``out``; their paths there."""
    import shutil

    def put(src: Path, report: Path, name: str) -> str:
        dst = out / name
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        if report.is_file():
            shutil.copyfile(report, out / f"{Path(name).stem}_RESULTS.md")
        return str(dst)

    return {"token_adapter": put(*trained["token_adapter"], "token_adapter"),
            "hidden_adapter": [put(src, rep, f"{src.parent.name}.safetensors") for src, rep in trained["hidden_adapter"]],
            "eagle_head": put(*trained["eagle_head"], "eagle_head")}


def drafter_flags(paths: dict[str, Any]) -> list[str]:
    """``--token_adapter P --hidden_adapter P1,P5 --eagle_head P`` for widen_pair and the twin benchmark."""
    flags = ["--token_adapter", paths["token_adapter"]]
    if paths["hidden_adapter"]:
        flags += ["--hidden_adapter", ",".join(paths["hidden_adapter"])]
    return flags + ["--eagle_head", paths["eagle_head"]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from common.results import atomic_write_json

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    extracted = extract(args, data, Path(args.data_dir) / "extracted")
    paths = collect(train(args, extracted, Path(args.data_dir) / "runs"), out)
    summary = {"pair": _pair_args(args)[1:4:2], "data": {k: str(v) for k, v in data.items()}, "paths": paths,
               "flags": drafter_flags(paths)}
    atomic_write_json(out / "drafters.json", summary)
    print("drafters: " + " ".join(summary["flags"]))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
