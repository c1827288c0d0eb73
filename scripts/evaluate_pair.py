"""Score the EventGPT (draft) / Video-LLaVA (target) pair's greedy answers against the synthetic ground truth.

    python -m scripts.evaluate_pair --dataset_dir data/synthetic_test --eventgpt_path models/eventgpt \\
        --videollava_path models/videollava [--max_samples 1000 --max_questions 10 --device cpu]

Each sample (clip x question, ``--max_questions`` top questions per clip, answers from the clip's
ground truth) is answered by both models with plain greedy decoding on prefilled states
(``common.speculative.autoregressive_generate``, stop at </s>). Reported per model, overall and per
question group (colour / static objects and road / motion / open scene descriptions):

- exact: share of answers equal to the ground truth (whitespace-normalised);
- f1: word F1 (lower-cased, punctuation dropped);
- key: F1 over the answer's key words (counts, colours, directions, yes/no, object kinds), and per
  key-word category the share of answers with exactly the right key words (``kw_colour`` etc.);
- a blind baseline: each question answered with its most frequent ground-truth answer on the TRAIN
  clips (``--blind_split``, default train; never the scored samples), i.e. what a model that
  ignores the clip reaches; without a train split it is left out;

and between the two models: token agreement (share of target positions where the draft's greedy
token equals the target's), answer agreement (identical answers) and the mean common prefix.

Writes results/evaluate_pair/<task_name>_<timestamp>/ (config.json, records.jsonl, results.json,
RESULTS.md with a legend, scores.png) and prints the table; an interrupted run resumes (``--no_resume`` starts a new folder).
Defaults: the shipped pair and the default synthetic split (common/defaults.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports happen inside the functions, so --help prints fast
    pass


MODELS = (("egpt", "eventgpt"), ("videollava", "videollava"))


def build_parser() -> argparse.ArgumentParser:
    from common.cli import add_common_args

    p = argparse.ArgumentParser(prog="python -m scripts.evaluate_pair", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.set_defaults(max_questions=10)
    p.add_argument("--max_new_tokens", type=int, default=48, help="greedy tokens per answer at most (default 48)")
    p.add_argument("--blind_split", default="train",
                   help="split whose ground-truth answers fit the blind baseline (default train; never the scored "
                        "samples)")
    return p


def _agreement(draft: list[int], target: list[int]) -> tuple[int, int, int]:
    """(positions where draft == target, target positions, common prefix length)."""
    from common.speculative import common_prefix_length

    same = sum(1 for a, b in zip(draft, target, strict=False) if a == b)
    return same, len(target), common_prefix_length(draft, target)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _model_stats(records: list[dict], prefix: str) -> dict[str, Any]:
    from common.training import KEYWORDS

    stats: dict[str, Any] = {"exact": _mean(r[f"{prefix}_exact"] for r in records),
                             "f1": _mean(r[f"{prefix}_f1"] for r in records),
                             "key": _mean(r[f"{prefix}_key"] for r in records)}
    for name in KEYWORDS:
        stats[f"kw_{name}"] = _mean(r[f"{prefix}_keywords"].get(name) for r in records)
    return stats


def fit_blind_baseline(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Per question, its most frequent answer among ``(question, answer)`` pairs (of train clips)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    for question, answer in pairs:
        by_question[question][answer] += 1
    return {q: counts.most_common(1)[0][0] for q, counts in by_question.items()}


def _blind_baseline(records: list[dict], guesses: dict[str, str]) -> list[dict]:
    """Scores of answering every question with its fitted guess ("" for a question never seen in training)."""
    from common.training import score_answer

    out = []
    for r in records:
        guess = guesses.get(r["query"], "")
        s = score_answer(guess, r["answer"])
        out.append({"blind_exact": s["exact"], "blind_f1": s["f1"], "blind_key": s["key"],
                    "blind_keywords": s["keywords"], "group": r["group"]})
    return out


def statistics(records: list[dict], guesses: dict[str, str] | None) -> dict[str, Any]:
    """Overall and per-group scores of both models, their agreement and the blind baseline (None: left out)."""
    from common.synthetic import LONG_QUESTIONS
    from common.training import QUESTION_GROUPS

    blind = _blind_baseline(records, guesses) if guesses else None

    def block(rs: list[dict], bs: list[dict]) -> dict[str, Any]:
        same = sum(r["token_matches"] for r in rs)
        positions = sum(r["target_positions"] for r in rs)
        return {
            "samples": len(rs),
            "eventgpt": _model_stats(rs, "egpt"),
            "videollava": _model_stats(rs, "videollava"),
            "blind": _model_stats(bs, "blind") if bs is not None else None,
            "token_agreement": same / positions if positions else None,
            "answer_agreement": _mean(float(r["answers_agree"]) for r in rs),
            "mean_common_prefix": _mean(r["common_prefix"] for r in rs),
            "mean_tokens": {"eventgpt": _mean(len(r["egpt_token_ids"]) for r in rs),
                            "videollava": _mean(len(r["videollava_token_ids"]) for r in rs)},
        }

    stats = {"overall": block(records, blind), "groups": {}, "long_questions": {}}
    for g in QUESTION_GROUPS:
        idx = [i for i, r in enumerate(records) if r["group"] == g]
        if idx:
            stats["groups"][g] = block([records[i] for i in idx], [blind[i] for i in idx] if blind else None)
    for q in LONG_QUESTIONS:  # per long-answer question (long only in --long_answers datasets)
        idx = [i for i, r in enumerate(records) if _plain_question(r["query"]) == q]
        if idx:
            stats["long_questions"][q] = block([records[i] for i in idx], [blind[i] for i in idx] if blind else None)
    return stats


def _plain_question(query: str) -> str:
    return query.replace("<event>", "").replace("<video>", "").strip()


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(stats: dict[str, Any]) -> str:
    """Two tables: scores per model and group, and draft/target agreement per group."""
    rows = [("all", stats["overall"])] + list(stats["groups"].items())
    cols = ["exact", "f1", "key", "kw_count", "kw_colour", "kw_direction", "kw_yes_no", "kw_kind"]
    lines = ["| group | n | model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for name, block in rows:
        for model in ("videollava", "eventgpt", "blind"):
            if block[model] is None:
                continue
            vals = [_fmt(block[model].get(c)) for c in cols]
            lines.append(f"| {name} | {block['samples']} | {model} | " + " | ".join(vals) + " |")
    lines += ["", "| group | n | token agreement | answer agreement | mean common prefix | "
              "mean tokens eventgpt | mean tokens videollava |", "|---|---|---|---|---|---|---|"]
    for name, block in rows:
        lines.append(f"| {name} | {block['samples']} | {_fmt(block['token_agreement'])} | "
                     f"{_fmt(block['answer_agreement'])} | {_fmt(block['mean_common_prefix'])} | "
                     f"{_fmt(block['mean_tokens']['eventgpt'])} | {_fmt(block['mean_tokens']['videollava'])} |")
    if stats.get("long_questions"):
        lines += ["", "| long-answer question | n | mean tokens videollava | mean tokens eventgpt | token agreement | "
                  "f1 videollava | f1 eventgpt | f1 blind | key videollava | key eventgpt | key blind |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for q, block in stats["long_questions"].items():
            blind = block["blind"] or {}
            lines.append(f"| {q} | {block['samples']} | {_fmt(block['mean_tokens']['videollava'])} | "
                         f"{_fmt(block['mean_tokens']['eventgpt'])} | {_fmt(block['token_agreement'])} | "
                         f"{_fmt(block['videollava']['f1'])} | {_fmt(block['eventgpt']['f1'])} | {_fmt(blind.get('f1'))} | "
                         f"{_fmt(block['videollava']['key'])} | {_fmt(block['eventgpt']['key'])} | "
                         f"{_fmt(blind.get('key'))} |")
    return "\n".join(lines) + "\n"


LEGEND = """How to read these tables:
- exact: share of answers equal to the ground truth (whitespace-normalised).
- f1: word F1 against the ground truth (lower-cased, punctuation dropped); key: F1 over the key words
  (counts, colours, directions, yes/no, object kinds); kw_<category>: share of answers whose key words of
  that category are exactly right (empty: the category does not occur).
- model videollava = the target, eventgpt = the draft; blind = every question answered with its most
  frequent answer on the train clips ({blind_source}): a model must beat it to show it uses the clip.
- token agreement: share of target positions where the draft's greedy token equals the target's (by
  index, no alignment); answer agreement: identical answers; mean common prefix: tokens before the first
  difference (what plain speculative decoding with the raw draft could accept at the start).
"""


def score_plot(stats: dict[str, Any], path: Any) -> Any:
    """scores.png: overall f1 and key-word F1 of target, draft and blind baseline."""
    from common.plots import plot_bars

    overall = stats["overall"]
    values = {f"{model} {metric}": overall[model][metric] for metric in ("f1", "key")
              for model in ("videollava", "eventgpt", "blind") if overall.get(model)}
    return plot_bars(values, path, title=f"Answer scores against the ground truth ({overall['samples']} samples)",
                     ylabel="score (0-1)")


def load_blind_guesses(dataset_dir: Any, split: str, max_questions: int, scored_split: str | None
                       ) -> tuple[dict[str, str], str]:
    """(guesses, where they come from): fitted on ``split``; empty when that split is missing or is the scored one."""
    from common.data import ClipDataset
    from common.errors import DataError

    if scored_split == split:
        return {}, f"left out: the scored split is the blind baseline's split {split!r}"
    try:
        train = [s for s in ClipDataset(dataset_dir, split=split, max_questions=max_questions).iter_samples()
                 if s.answer]
    except DataError:
        return {}, f"left out: no {split!r} split in {dataset_dir}"
    return fit_blind_baseline([(s.question, s.answer) for s in train]), f"fitted on {len(train)} {split} samples"


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns {"run_dir", "statistics", "samples"}."""
    args = build_parser().parse_args(argv)  # before the heavy imports: --help prints fast
    from common.cli import resolve_device, resolve_quant, set_seed, shard
    from common.data import ClipDataset, default_frame_cache, sample_fields
    from common.defaults import resolve_dataset_dir, resolve_model_paths
    from common.models.loader import load_vlm
    from common.progress import progress
    from common.results import RunFolder
    from common.run_index import results_root_of, update_index
    from common.speculative import autoregressive_generate
    from common.training import question_group, score_answer

    set_seed(args.seed)
    device = resolve_device(args.device)
    quant = resolve_quant(args)
    dataset_dir = resolve_dataset_dir(args.dataset_dir)
    egpt_path, vl_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    dataset = ClipDataset(dataset_dir, split=args.split, max_questions=args.max_questions,
                          allow_pickle=args.allow_pickle, event_source=args.event_source)
    samples = list(dataset.iter_samples())
    samples = [s for s in samples if s.answer]
    if args.max_samples is not None:
        samples = samples[: args.max_samples]
    samples = shard(samples, args.num_chunks, args.chunk_idx)
    models = {
        "egpt": load_vlm("eventgpt", egpt_path, quant=quant, device=device, allow_pickle=args.allow_pickle),
        "videollava": load_vlm("videollava", vl_path, quant=quant, device=device,
                               frame_cache=default_frame_cache(dataset_dir)),
    }
    run = RunFolder.create("evaluate_pair", args.task_name or "evaluate_pair", args.output_dir, resume=args.resume)
    run.write_config({**vars(args), "dataset_dir": str(dataset_dir), "eventgpt_path": str(egpt_path),
                      "videollava_path": str(vl_path), "quant": quant}, argv)
    done = run.finished_ids()
    visual_cache: dict[str, tuple[str, Any]] = {}
    for sample in progress(samples, "evaluate_pair", "sample"):
        if sample.id in done:
            continue
        record: dict[str, Any] = {**sample_fields(sample), "answer": sample.answer,
                                  "group": question_group(sample.question)}
        for prefix, model in models.items():
            t0 = time.perf_counter()
            cached = visual_cache.get(prefix)
            if cached is None or cached[0] != sample.clip_id:
                cached = visual_cache[prefix] = (sample.clip_id, model.encode(sample))
            state = model.prefill(cached[1], sample.question)
            result = autoregressive_generate(model, state, max_new_tokens=args.max_new_tokens)
            tokens = [int(t) for t in result.tokens]
            text = model.decode_text([t for t in tokens if t != model.eos_token_id])
            scores = score_answer(text, sample.answer)
            record.update({prefix: text, f"{prefix}_token_ids": tokens, f"{prefix}_time": time.perf_counter() - t0,
                           f"{prefix}_exact": scores["exact"], f"{prefix}_f1": scores["f1"],
                           f"{prefix}_key": scores["key"], f"{prefix}_keywords": scores["keywords"]})
        same, positions, prefix_len = _agreement(record["egpt_token_ids"], record["videollava_token_ids"])
        record.update({"token_matches": same, "target_positions": positions, "common_prefix": prefix_len,
                       "answers_agree": record["egpt_token_ids"] == record["videollava_token_ids"]})
        run.append_record(record)
    wanted = {s.id for s in samples}
    records = [r for r in run.load_records() if r["id"] in wanted]
    guesses, blind_source = load_blind_guesses(dataset_dir, args.blind_split, args.max_questions, args.split)
    stats = statistics(records, guesses) if records else {}
    if stats:
        stats["blind_source"] = blind_source
    table = markdown(stats) if records else "no samples\n"
    header = (f"# evaluate_pair\n\ndataset `{dataset_dir}` (split {args.split or 'all'}, {len(records)} samples, "
              f"{args.max_questions} questions per clip); eventgpt `{egpt_path}`, videollava `{vl_path}`; "
              f"{quant} on {device}; greedy, at most {args.max_new_tokens} new tokens.\n\n")
    run.write_results(records, stats)
    run.write_markdown(header + table + ("\n" + LEGEND.format(blind_source=blind_source) +
                                         "\n![scores](scores.png)\n" if records else ""))
    if records:
        score_plot(stats, run.path / "scores.png")
    run.mark_done()
    update_index(results_root_of(run.path))
    print(table, file=sys.stdout)
    print(f"run folder: {run.path}", file=sys.stderr)
    return {"run_dir": str(run.path), "statistics": stats, "samples": len(records)}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
