"""Draft and target together: real concurrent prefill, free draft tokens, lossless speculation.

    python -m benchmark_parallel_prefill.benchmark_parallel_prefill [--dataset_dir D --eventgpt_path P
        --videollava_path P --gamma 5 --quant 4bit --max_samples N --max_new_tokens 50
        --draft_device cuda:1 --target_device cuda:0 --output_dir O --task_name T]

Per sample: the target alone (same engine, same run: stages 1-4 + greedy decode), then both
models at once: the target prefills on its own stream/thread (or GPU) while EventGPT
prefills and decodes free tokens until the target's prefill completes; then the speculative
loop verifies the free tokens first. Records the measured overlap window, free and accepted
tokens, each model's stage times in the concurrent run, the target's prefill slowdown from
sharing the device, and whether the text equals the target's own (it must).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from typing import Any

from common.cli import add_common_args, add_retry_arg, non_negative_int
from common.flags import add_decode_args, add_drafter_args, add_tree_args
from common.harness import Benchmark, exit_code, run_benchmark
from common.results import markdown_table, summarize

STAGE = "benchmark_parallel_prefill"
log = logging.getLogger(STAGE)
TIMELINE_SAMPLES = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {STAGE}.{STAGE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_retry_arg(parser)
    g = parser.add_argument_group("parallel decoding")
    g.add_argument("--gamma_after_prefill", type=non_negative_int, default=None,
                   help="draft length once the free tokens are verified (default --gamma; 0 = use only the "
                        "free tokens, then plain decoding: for drafters as costly as the target)")
    g.add_argument("--draft_device", default=None, help="device of EventGPT (default: --device)")
    g.add_argument("--target_device", default=None, help="device of Video-LLaVA (default: --device)")
    add_decode_args(g, free_tokens=True)
    add_drafter_args(parser)
    add_tree_args(parser)
    return parser


def target_alone(target, sample, max_new_tokens: int) -> tuple[float, list[int], dict[str, float]]:
    """The baseline: stages 1-4 and greedy decoding of the target by itself."""
    from common.pipeline import time_target_alone

    seconds, pre, gen = time_target_alone(target, sample, max_new_tokens)
    return seconds, list(gen.tokens), pre.times


def process_sample(draft, target, sample, args, make_drafter) -> tuple[dict[str, Any], list[dict]]:
    """Target alone, then the concurrent run, for one sample."""
    from common.concurrency import named_options
    from common.data import sample_fields
    from common.drafters import DrafterFactory, aligned_fields
    from common.parallel import run_parallel
    from common.pipeline import STAGES, lossless_numerics, reference_tokens

    alone_s, alone_tokens, alone_stages = target_alone(target, sample, args.max_new_tokens)
    with lossless_numerics(target, args) as step:
        reference = reference_tokens(target, sample, args.max_new_tokens) if step else alone_tokens
        out = run_parallel(draft, make_drafter.engine_target(target), sample, make_drafter,
                           max_new_tokens=args.max_new_tokens,
                           gamma=args.gamma_after_prefill if args.gamma_after_prefill is not None else args.gamma,
                           max_free_tokens=args.max_free_tokens, tree=args.tree,
                           concurrency=named_options(getattr(args, "concurrency", None)))
        aligned = {}
        if make_drafter.kind == "token_adapter":  # the raw EventGPT drafter on the same sample, for comparison
            raw = run_parallel(draft, target, sample, DrafterFactory("eventgpt"), max_new_tokens=args.max_new_tokens,
                               gamma=args.gamma, max_free_tokens=args.max_free_tokens)
            aligned = aligned_fields(make_drafter, out.drafter, out.result, raw.result)
    res = out.result
    record: dict[str, Any] = {
        **sample_fields(sample),
        "videollava": target.decode_text(alone_tokens), "videollava_token_ids": alone_tokens,
        "videollava_time": alone_s,
        "parallel_videollava": target.decode_text(res.tokens), "parallel_token_ids": list(res.tokens),
        "parallel_time": out.wall_seconds, "identical": list(res.tokens) == reference,
        "reference_token_ids": reference, "identical_to_fastest": list(res.tokens) == alone_tokens,
        "speedup": alone_s / out.wall_seconds,
        "overlap_window_ms": 1000 * out.overlap_window, "free_draft_tokens": len(out.free_tokens),
        "accepted_free_tokens": out.accepted_free_tokens,
        "acceptance_rate": res.acceptance_rate, "mean_accepted_length": res.mean_accepted_length,
        "token_acceptance_probability": res.token_acceptance_probability,
        "iterations": [list(i) for i in res.iterations], "draft_seconds": res.draft_seconds,
        "verify_seconds": res.verify_seconds, "target_forwards": res.target_forwards,
        "speculative_decode_time": out.timings["speculative_seconds"],
        "target_prefill_end_ms": 1000 * out.target_prefill_end, "draft_prefill_end_ms": 1000 * out.draft_prefill_end,
    }
    for stage in STAGES[:4]:
        record[f"videollava_{stage}_time"] = out.target.times[stage]
        record[f"egpt_{stage}_time"] = out.draft.times[stage]
        record[f"videollava_alone_{stage}_time"] = alone_stages[stage]
    record["target_prefill_slowdown"] = out.target.times["stage4"] / alone_stages["stage4"]
    record.update(aligned)
    return record, out.intervals


def compute_statistics(records: list[dict[str, Any]], gamma: int, cost_ratio: float | None = None) -> dict[str, Any]:
    """Rates, means (with std) and the measured vs predicted speedup.

    ``cost_ratio``: the measured c; None takes the mean of the ``cost_ratio_c`` each record carries
    (the value measured in the session that made it), so a resumed run predicts as an uninterrupted one.
    """
    from common.drafters import aligned_statistics
    from common.pipeline import STAGES
    from common.speculative import SpecResult, aggregate_metrics, predicted_speedup

    ok = [r for r in records if "error" not in r]
    stats: dict[str, Any] = {"num_samples": len(ok), "num_failed": len(records) - len(ok), "gamma": gamma}
    if not ok:
        return stats
    stats["lossless_rate"] = sum(r["identical"] for r in ok) / len(ok)
    stats["identical_to_fastest_rate"] = sum(bool(r.get("identical_to_fastest")) for r in ok) / len(ok)
    stats["speedup_measured"] = sum(r["videollava_time"] for r in ok) / sum(r["parallel_time"] for r in ok)
    for key in ("overlap_window_ms", "free_draft_tokens", "accepted_free_tokens", "acceptance_rate",
                "mean_accepted_length", "target_prefill_slowdown", "speedup"):
        summary = summarize(r[key] for r in ok)
        stats[f"{key}_avg"], stats[f"{key}_std"] = summary["mean"], summary["std"]
    pooled = aggregate_metrics([SpecResult.from_record(r, tokens="parallel_token_ids") for r in ok])
    stats["pooled"] = pooled
    a = pooled.get("token_acceptance_probability")
    if cost_ratio is None:
        cost_ratio = summarize(r.get("cost_ratio_c") for r in ok)["mean"]
    stats["cost_ratio_c"] = cost_ratio
    stats["speedup_predicted"] = (predicted_speedup(a, gamma, cost_ratio)
                                  if a is not None and cost_ratio is not None else None)
    for model in ("egpt", "videollava"):
        for stage in STAGES[:4]:
            summary = summarize(r[f"{model}_{stage}_time"] for r in ok)
            stats[f"{model}_{stage}_time_avg"], stats[f"{model}_{stage}_time_std"] = summary["mean"], summary["std"]
    stats.update(aligned_statistics(ok, "acceptance_rate", "mean_accepted_length"))
    return stats


def measure_cost_ratio(draft, target, sample, make_drafter, steps: int = 8, repeats: int = 5) -> float:
    """c = draft step seconds / target step seconds, measured on this sample (1-token steps).

    The median of ``repeats`` interleaved measurements: one 8-step ratio moved by +-25% between
    repeats on a busy CPU (0.30-0.49 over 12 repeats of the demo pair), and the Leviathan
    prediction with it."""
    from common.parallel import timed
    from common.pipeline import prefill_sample

    states = {id(vlm): prefill_sample(vlm, sample).state for vlm in (draft, target)}

    def per_step(vlm):
        seconds, _ = timed(lambda: [vlm.forward(states[id(vlm)], [5]) for _ in range(steps)], vlm.device)
        return seconds / steps

    return statistics.median(per_step(draft) / per_step(target) for _ in range(repeats))


def render_markdown(stats: dict[str, Any], argv: list[str], name: str, drafter: str) -> str:
    n = stats["num_samples"]
    lines = [f"# benchmark_parallel_prefill: {name}", "", f"Command: `python -m {STAGE}.{STAGE} {' '.join(argv)}`",
             "", f"Drafter: {drafter}. Samples: {n} (failed: {stats['num_failed']}); torch threads per model "
                 f"lane: {stats.get('torch_threads')}", ""]
    if not n:
        return "\n".join(lines)
    rows = [{"metric": k, "value": stats.get(k), "std": stats.get(k.replace("_avg", "_std")) if k.endswith("_avg")
             else None, "n": n} for k in (
        "lossless_rate", "identical_to_fastest_rate", "speedup_measured", "speedup_predicted", "cost_ratio_c",
        "overlap_window_ms_avg", "free_draft_tokens_avg", "accepted_free_tokens_avg", "acceptance_rate_avg",
        "mean_accepted_length_avg", "target_prefill_slowdown_avg", "speedup_avg")]
    lines += [markdown_table(rows, ["metric", "value", "std", "n"], floatfmt=".3f"), "",
              f"acceptance_rate = accepted draft tokens / drafted tokens, the free tokens drafted during the "
              f"target's prefill included in the denominator (vLLM's draft acceptance rate); mean_accepted_length "
              f"= 1 + accepted / verify steps, at gamma {stats['gamma']}.", "",
              "speedup_measured = target-alone wall time / concurrent speculative wall time, summed over "
              "samples, both measured in this run. speedup_predicted is Leviathan's decode-phase formula "
              "from the measured acceptance and cost ratio (it ignores the prefill overlap). *_avg rows are "
              "per-sample means, std their spread.", "",
              "Timeline: timeline.png (both models' stages on one axis); speedup_vs_acceptance.png.", ""]
    return "\n".join(lines)


def write_plots(run: Any, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    """timeline.png (the records' stored timelines) and speedup_vs_acceptance.png of a run."""
    from common.plots import plot_speedup_vs_acceptance, plot_timelines

    timelines = [(r["id"], r["timeline"]) for r in records if "timeline" in r][:TIMELINE_SAMPLES]
    if timelines:
        plot_timelines([t for _, t in timelines], run.path / "timeline.png", titles=[i for i, _ in timelines])
    ok = [r for r in records if "error" not in r]
    cost_ratio = stats.get("cost_ratio_c")
    if ok and cost_ratio is not None:
        points = [{"acceptance": r["token_acceptance_probability"] or 0.0, "speedup": r["speedup"]} for r in ok]
        plot_speedup_vs_acceptance(points, run.path / "speedup_vs_acceptance.png", gamma=stats["gamma"],
                                   cost_ratio=cost_ratio)


def write_readouts(run: Any, records: list[dict[str, Any]], stats: dict[str, Any], argv: list[str],
                   drafter: str, quant: str | None = None) -> None:
    """results.json, RESULTS.md and the plots of merged shards (scripts.merge_results); a run writes its own
    through the harness."""
    from common.harness import write_readouts as write_run

    write_run(run, STAGE, records, stats, render_markdown(stats, argv, run.path.name, drafter),
              str(stats.get("device") or "cpu"), quant)
    write_plots(run, records, stats)


class ParallelBenchmark(Benchmark):
    """The target alone, then draft and target at once, per sample."""

    def __init__(self, draft, target, args: argparse.Namespace, make_drafter, mode: str, argv: list[str]):
        self.draft, self.target, self.args, self.make_drafter = draft, target, args, make_drafter
        self.mode, self.argv = mode, argv
        self.event_frames = getattr(draft, "num_event_frames", None)
        self.cost_ratio: float | None = None
        self.timelines = 0

    def begin(self, run) -> None:
        from common.drafters import record_drafter

        record_drafter(run.path / "config.json", self.make_drafter)  # e.g. which TokenAdapter was picked

    def warmup(self, sample, steps: int) -> None:
        """Warm-up steps, then c measured on this sample (every record of this session carries it)."""
        for _ in range(steps):
            process_sample(self.draft, self.target, sample, self.args, self.make_drafter)
        self.cost_ratio = measure_cost_ratio(self.draft, self.target, sample, self.make_drafter)

    def process(self, sample, unit: str, done) -> dict[str, Any]:
        record, intervals = process_sample(self.draft, self.target, sample, self.args, self.make_drafter)
        record["cost_ratio_c"] = self.cost_ratio
        if self.timelines + sum("timeline" in r for r in done.values()) < TIMELINE_SAMPLES:
            record["timeline"] = intervals
            self.timelines += 1
        return record

    def statistics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        stats = compute_statistics(records, self.args.gamma)
        stats.update(decode_mode=self.mode, drafter=self.make_drafter.kind, draft_device=str(self.draft.device),
                     target_device=str(self.target.device))
        return stats

    def render(self, stats, records, run) -> str:
        return render_markdown(stats, self.argv, run.path.name, self.make_drafter.kind)

    def finish(self, stats, records, run) -> None:
        write_plots(run, records, stats)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # before the heavy imports: --help prints at once
    from common.pipeline import load_benchmark_pair, prepare_benchmark
    from common.tree import tree_from_flags

    # both models run at once: on a CPU each lane gets half the cores (pinned, recorded)
    dataset_dir, samples, settings = prepare_benchmark(STAGE, args, argv, default_task="parallel", lanes=2)

    def make() -> ParallelBenchmark:
        draft, target, mode, make_drafter = load_benchmark_pair(args, dataset_dir)
        args.tree = tree_from_flags(args.tree_topk, args.tree_tokens, [make_drafter.kind], args.tree_depth)
        return ParallelBenchmark(draft, target, args, make_drafter, mode, argv)

    return run_benchmark(settings, samples, make)


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main, exit_code=exit_code)

