"""Stage-timed inference of both models, their token agreement, and lossless speculative decoding.

    python -m benchmark_inference.benchmark_inference [--dataset_dir D --eventgpt_path P
        --videollava_path P --max_samples N --warmup_steps W --quant Q --device DEV
        --max_new_tokens 50 --gamma 5 --output_dir O --task_name T]

For each sample and each model: five timed stages (1 data load, 2 preprocess, 3 vision
encode, 4 LLM prefill, 5 decode), texts and token ids; the index-aligned token agreement of
the two outputs; then Video-LLaVA decoded speculatively with EventGPT drafting (sequential
here: the concurrent version is benchmark_parallel_prefill), checking that the text equals
the target's own. With no flags it runs on the embedded default pair and synthetic split.
Rerunning with the same --task_name continues an unfinished run made with the same settings
(other settings are refused in one line); bad samples are recorded with their error and
skipped, and --retry_failed runs them again. The run loop is common.harness.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from common.cli import add_common_args, add_retry_arg
from common.flags import add_decode_args, add_drafter_args, add_tree_args
from common.harness import Benchmark, exit_code, run_benchmark
from common.results import markdown_table, summarize

if TYPE_CHECKING:  # the heavy modules load where they are used, so --help needs no torch
    from common.speculative import SpecResult

STAGE = "benchmark_inference"
MODELS = ("egpt", "videollava")
log = logging.getLogger(STAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {STAGE}.{STAGE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_retry_arg(parser)
    add_drafter_args(parser)
    add_tree_args(parser)
    g = parser.add_argument_group("decoding")
    add_decode_args(g)
    return parser


def speculative_sample(draft, target, sample, args, make_drafter) -> tuple[dict[str, Any], SpecResult, Any]:
    """Target + draft prefilled afresh, then the speculative loop; times are end to end."""
    from common.pipeline import prefill_sample
    from common.speculative import speculative_generate
    from common.timing import sync

    start = time.perf_counter()
    engine_target = make_drafter.engine_target(target)
    tgt = prefill_sample(engine_target, sample)
    drf = prefill_sample(draft, sample, hidden_layers=make_drafter.hidden_layers)
    drafter = make_drafter(draft, drf.state, engine_target)
    result = speculative_generate(engine_target, tgt.state, drafter, max_new_tokens=args.max_new_tokens,
                                  gamma=args.gamma, sync=lambda: sync(target.device), tree=args.tree)
    sync(target.device)
    total = time.perf_counter() - start
    fields = {
        "sd_videollava": target.decode_text(result.tokens),
        "sd_token_ids": list(result.tokens),
        "sd_time": total,
        "sd_decode_time": result.total_seconds,
        "sd_acceptance_rate": result.acceptance_rate,
        "sd_mean_accepted_length": result.mean_accepted_length,
        "sd_token_acceptance_probability": result.token_acceptance_probability,
        "sd_draft_seconds": result.draft_seconds,
        "sd_verify_seconds": result.verify_seconds,
        "sd_draft_steps": result.draft_steps,
        "sd_target_forwards": result.target_forwards,
        "sd_iterations": [list(it) for it in result.iterations],
    }
    return fields, result, drafter


def process_sample(draft, target, sample, args, make_drafter) -> tuple[dict[str, Any], SpecResult]:
    """Everything measured for one sample."""
    from common.data import sample_fields
    from common.drafters import DrafterFactory, aligned_fields
    from common.pipeline import lossless_numerics, reference_tokens, run_model, token_match_rate

    record: dict[str, Any] = sample_fields(sample)
    record.update(run_model(draft, sample, "egpt", args.max_new_tokens))
    record.update(run_model(target, sample, "videollava", args.max_new_tokens))
    in_target_vocab = target.tokenize(record["egpt"])  # the draft's text in the target's tokenizer
    record.update(token_match_rate(in_target_vocab, record["videollava_token_ids"]))
    with lossless_numerics(target, args) as step:
        reference = reference_tokens(target, sample, args.max_new_tokens) if step else record["videollava_token_ids"]
        sd_fields, result, drafter = speculative_sample(draft, target, sample, args, make_drafter)
        if make_drafter.kind == "token_adapter":  # the raw EventGPT drafter on the same sample, for comparison
            _, raw_result, _ = speculative_sample(draft, target, sample, args, DrafterFactory("eventgpt"))
            record.update(aligned_fields(make_drafter, drafter, result, raw_result))
    record.update(sd_fields)
    record["videollava_reference_token_ids"] = reference
    record["sd_identical"] = record["sd_token_ids"] == reference
    record["sd_identical_to_fastest"] = record["sd_token_ids"] == record["videollava_token_ids"]
    return record, result


def compute_statistics(records: list[dict[str, Any]], gamma: int) -> dict[str, Any]:
    """Means (with std) of stage times, agreement and the speculative metrics, measured beside predicted speedup."""
    from common.drafters import aligned_statistics
    from common.pipeline import STAGES
    from common.speculative import SpecResult, aggregate_metrics, predicted_speedup

    ok = [r for r in records if "error" not in r]
    stats: dict[str, Any] = {"num_samples": len(ok), "num_failed": len(records) - len(ok), "gamma": gamma}
    if not ok:
        return stats
    for model in MODELS:
        for key in [f"{stage}_time" for stage in STAGES] + ["time", "decode_ms_per_token"]:
            summary = summarize(r[f"{model}_{key}"] for r in ok)
            stats[f"{model}_{key}_avg"], stats[f"{model}_{key}_std"] = summary["mean"], summary["std"]
    summary = summarize(r["acceptance_rate"] for r in ok)
    stats["acceptance_rate_avg"], stats["acceptance_rate_std"] = summary["mean"], summary["std"]
    stats["matching_prefix_avg"] = summarize(r["matching_prefix"] for r in ok)["mean"]
    stats["sd_lossless_rate"] = sum(bool(r["sd_identical"]) for r in ok) / len(ok)
    stats["sd_identical_to_fastest_rate"] = sum(bool(r.get("sd_identical_to_fastest")) for r in ok) / len(ok)
    for key in ("sd_acceptance_rate", "sd_mean_accepted_length", "sd_time"):
        summary = summarize(r[key] for r in ok)
        stats[f"{key}_avg"], stats[f"{key}_std"] = summary["mean"], summary["std"]
    pooled = aggregate_metrics([SpecResult.from_record(r, prefix="sd_", total_seconds="decode_time") for r in ok])
    stats["sd_pooled"] = pooled
    baseline = sum(r["videollava_time"] for r in ok)
    stats["sd_speedup_measured"] = baseline / sum(r["sd_time"] for r in ok)
    stats["sd_decode_speedup_measured"] = sum(r["videollava_stage5_time"] for r in ok) / sum(
        r["sd_decode_time"] for r in ok)
    # Leviathan's prediction for the decode phase from the MEASURED acceptance and step-cost ratio c
    c = stats["egpt_decode_ms_per_token_avg"] / stats["videollava_decode_ms_per_token_avg"]
    a = pooled.get("token_acceptance_probability")
    stats["sd_cost_ratio_c"] = c
    stats["sd_token_acceptance_probability"] = a
    stats["sd_speedup_predicted"] = None if a is None else predicted_speedup(a, gamma, c)
    stats.update(aligned_statistics(ok, "sd_acceptance_rate", "sd_mean_accepted_length"))
    return stats


def render_markdown(stats: dict[str, Any], argv: list[str], run_path) -> str:
    """The RESULTS.md summary a person reads."""
    from common.pipeline import STAGE_NAMES, STAGES

    n = stats["num_samples"]
    lines = [f"# benchmark_inference: {run_path.name}", "", f"Command: `python -m {STAGE}.{STAGE} {' '.join(argv)}`",
             "", f"Samples: {n} (failed: {stats['num_failed']}); torch threads per model: "
                 f"{stats.get('torch_threads')}", ""]
    if not n:
        return "\n".join(lines)
    rows = []
    for key, label in [(f"{stage}_time", f"{stage} {STAGE_NAMES[stage]}") for stage in STAGES] + [("time", "total")]:
        rows.append({"stage": label, "n": n,
                     "EventGPT ms": 1000 * stats[f"egpt_{key}_avg"], "EventGPT std": 1000 * stats[f"egpt_{key}_std"],
                     "Video-LLaVA ms": 1000 * stats[f"videollava_{key}_avg"],
                     "Video-LLaVA std": 1000 * stats[f"videollava_{key}_std"]})
    lines += [f"## Stage times (mean and std over n = {n} samples)", "", markdown_table(rows, floatfmt=".1f"), ""]
    spec = [
        {"metric": "raw token agreement (index-aligned), mean", "value": stats["acceptance_rate_avg"],
         "std": stats["acceptance_rate_std"], "n": n},
        {"metric": "SD lossless rate (identical to the target's own output)", "value": stats["sd_lossless_rate"]},
        {"metric": "identical to the fastest 1-token decode", "value": stats["sd_identical_to_fastest_rate"]},
        {"metric": "SD draft acceptance rate (vLLM: accepted / drafted)", "value": stats["sd_acceptance_rate_avg"],
         "std": stats["sd_acceptance_rate_std"], "n": n},
        {"metric": "SD mean accepted length (1 + accepted / verify steps)", "value": stats["sd_mean_accepted_length_avg"],
         "std": stats["sd_mean_accepted_length_std"], "n": n},
        {"metric": "draft/target step cost ratio c (measured)", "value": stats["sd_cost_ratio_c"]},
        {"metric": "end-to-end speedup, measured", "value": stats["sd_speedup_measured"]},
        {"metric": "decode-phase speedup, measured", "value": stats["sd_decode_speedup_measured"]},
        {"metric": "decode-phase speedup, Leviathan prediction", "value": stats["sd_speedup_predicted"]},
    ]
    lines += [f"## Speculative decoding (gamma {stats['gamma']}, sequential, drafter {stats.get('drafter')})", "",
              markdown_table(spec, ["metric", "value", "std", "n"], floatfmt=".3f"), "",
              "The prediction uses the measured per-token acceptance and the measured cost ratio; "
              "the measured speedups are wall clock on this run.", ""]
    return "\n".join(lines)


def write_plots(run: Any, stats: dict[str, Any]) -> None:
    """stage_breakdown.png of a run."""
    from common.pipeline import STAGE_NAMES, STAGES
    from common.plots import plot_stage_breakdown

    if stats["num_samples"]:
        means = {m: {f"{s} {STAGE_NAMES[s]}": stats[f"{m}_{s}_time_avg"] for s in STAGES} for m in MODELS}
        plot_stage_breakdown(means, run.path / "stage_breakdown.png", title="Stage times per model")


def write_readouts(run: Any, records: list[dict[str, Any]], stats: dict[str, Any], argv: list[str],
                   quant: str | None = None) -> None:
    """results.json, RESULTS.md and the plots of merged shards (scripts.merge_results); a run writes its own
    through the harness."""
    from common.harness import write_readouts as write_run

    write_run(run, STAGE, records, stats, render_markdown(stats, argv, run.path), str(stats.get("device") or "cpu"),
              quant)
    write_plots(run, stats)


class InferenceBenchmark(Benchmark):
    """Both models timed alone, then speculative decoding, per sample."""

    def __init__(self, draft, target, args: argparse.Namespace, make_drafter, mode: str, argv: list[str]):
        self.draft, self.target, self.args, self.make_drafter = draft, target, args, make_drafter
        self.mode, self.argv = mode, argv
        self.event_frames = getattr(draft, "num_event_frames", None)

    def begin(self, run) -> None:
        from common.drafters import record_drafter

        record_drafter(run.path / "config.json", self.make_drafter)  # e.g. which TokenAdapter was picked

    def warmup(self, sample, steps: int) -> None:
        for _ in range(steps):
            process_sample(self.draft, self.target, sample, self.args, self.make_drafter)

    def process(self, sample, unit: str, done) -> dict[str, Any]:
        return process_sample(self.draft, self.target, sample, self.args, self.make_drafter)[0]

    def statistics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from common.tree import tree_summary

        stats = compute_statistics(records, self.args.gamma)
        tree = self.args.tree
        stats.update(decode_mode=self.mode, drafter=self.make_drafter.kind,
                     tree=None if tree is None else tree_summary(tree))
        return stats

    def render(self, stats, records, run) -> str:
        return render_markdown(stats, self.argv, run.path)

    def finish(self, stats, records, run) -> None:
        write_plots(run, stats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the statistics and the run folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # before the heavy imports: --help prints at once
    from common.pipeline import load_benchmark_pair, prepare_benchmark
    from common.tree import tree_from_flags

    dataset_dir, samples, settings = prepare_benchmark(STAGE, args, argv, default_task="benchmark")

    def make() -> InferenceBenchmark:
        draft, target, mode, make_drafter = load_benchmark_pair(args, dataset_dir)
        log.info("decode mode %s", mode)
        args.tree = tree_from_flags(args.tree_topk, args.tree_tokens, [make_drafter.kind], args.tree_depth)
        return InferenceBenchmark(draft, target, args, make_drafter, mode, argv)

    return run_benchmark(settings, samples, make)


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main, exit_code=exit_code)
