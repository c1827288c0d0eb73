"""The demo's SUMMARY.md: honest key numbers of one demo run (sizes, spread, the strongest baseline).

Pure functions over the stages' results (no models): :func:`benchmark_rows`,
:func:`drafter_rows`, :func:`render_summary`. Every learned drafter is compared with raw
EventGPT next-token drafting (the strongest plain baseline), teacher forced AND live.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ACCEPTANCE_DEFINITION = (
    "acceptance rate = accepted draft tokens / drafted tokens (vLLM's draft acceptance rate; in "
    "benchmark_parallel_prefill the free tokens drafted during the target's prefill count in the "
    "denominator too); mean accepted length = 1 + accepted / verify steps (tokens gained per target pass)."
)

CPU_CAVEAT = (
    "**Read this first.** This demo runs a tiny model pair (a few MB, trained on synthetic clips) on a CPU so "
    "that it finishes in minutes. The acceptance rates and the lossless checks are real for this tiny pair. "
    "The timings (ms, speedups, the cost ratio c) are CPU timings of tiny models, dominated by Python "
    "overhead: they say nothing about speed on a GPU or with the 7B models. The samples are few, so every "
    "number comes with its n and spread."
)


def spread(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, mean, std (population, as the benchmarks report it), median, min and max (common.results.summarize)."""
    from common.results import summarize

    return summarize(values)


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; None -> "n/a"."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_spread(s: Mapping[str, Any], digits: int = 3) -> str:
    """``mean ± std (min-max)`` of a :func:`spread`."""
    if not s.get("count"):
        return "n/a"
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], digits)} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


def leviathan(a: float, gamma: int, c: float) -> float:
    """Leviathan's expected wall-time gain (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    tokens = gamma + 1 if a >= 1.0 else (1 - a ** (gamma + 1)) / (1 - a)
    return tokens / (gamma * c + 1)


def cost_ratios(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per-sample c = EventGPT decode ms per token / Video-LLaVA decode ms per token (benchmark_inference records)."""
    out = []
    for r in records:
        d, t = r.get("egpt_decode_ms_per_token"), r.get("videollava_decode_ms_per_token")
        if isinstance(d, (int, float)) and isinstance(t, (int, float)) and t > 0:
            out.append(d / t)
    return out


def predicted_speedup(a: float | None, gamma: int, cs: Sequence[float]) -> dict[str, float | None]:
    """Leviathan at the median per-sample c, and at the largest and smallest c (the range c's spread allows)."""
    if a is None or not cs:
        return {"median": None, "low": None, "high": None, "c_median": None, "c_min": None, "c_max": None}
    c_med = statistics.median(cs)
    return {"median": leviathan(a, gamma, c_med), "low": leviathan(a, gamma, max(cs)),
            "high": leviathan(a, gamma, min(cs)), "c_median": c_med, "c_min": min(cs), "c_max": max(cs)}


def _ok(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if "error" not in r]


def _mean_row(b: str, measure: str, key: str, stats: Mapping[str, Any], ok: Sequence[Mapping[str, Any]],
              digits: int = 3) -> dict:
    """A row of the run's ``<key>_avg`` with the spread of ``key`` over the samples ``ok``."""
    return {"benchmark": b, "measure": measure, "value": fmt(stats.get(f"{key}_avg"), digits),
            "n": f"{len(ok)} samples", "spread": fmt_spread(spread(r.get(key) for r in ok), digits)}


def _lossless_row(b: str, ok: Sequence[Mapping[str, Any]], key: str) -> dict:
    """How many of the samples ``ok`` have a true ``key`` (output == the target's own)."""
    lossless = sum(bool(r.get(key)) for r in ok)
    return {"benchmark": b, "measure": "lossless (output == the target's own)", "value": f"{lossless}/{len(ok)}",
            "n": f"{len(ok)} samples", "spread": ""}


def inference_rows(stats: Mapping[str, Any], records: Sequence[Mapping[str, Any]], gamma: int) -> list[dict]:
    """benchmark_inference: timings, raw agreement, sequential speculation (a, c, measured and predicted)."""
    ok = _ok(records)
    n = f"{len(ok)} samples"
    speed = spread(r["videollava_time"] / r["sd_time"] for r in ok if r.get("sd_time"))
    cs = cost_ratios(ok)
    pred = predicted_speedup(stats.get("sd_token_acceptance_probability"), gamma, cs)
    b = "benchmark_inference"
    return [
        {"benchmark": b, "measure": "decode ms per token: EventGPT / Video-LLaVA (CPU)",
         "value": f"{fmt(stats.get('egpt_decode_ms_per_token_avg'), 1)} / "
                  f"{fmt(stats.get('videollava_decode_ms_per_token_avg'), 1)}", "n": n, "spread": ""},
        _mean_row(b, "raw answers, same index (D_j == t_j; the weakest baseline)", "acceptance_rate", stats, ok),
        _mean_row(b, "speculation with raw EventGPT drafting: acceptance rate", "sd_acceptance_rate", stats, ok),
        _mean_row(b, "mean accepted length", "sd_mean_accepted_length", stats, ok, digits=2),
        {"benchmark": b, "measure": "cost ratio c = draft / target decode step (CPU-timed, median)",
         "value": fmt(pred["c_median"]), "n": n,
         "spread": f"range {fmt(pred['c_min'])}-{fmt(pred['c_max'])}" if cs else "n/a"},
        {"benchmark": b, "measure": "speedup measured end to end (per sample)",
         "value": fmt(speed["mean"], 2), "n": n, "spread": fmt_spread(speed, 2)},
        {"benchmark": b, "measure": "speedup predicted for decode (Leviathan at median c)",
         "value": fmt(pred["median"], 2), "n": n,
         "spread": f"{fmt(pred['low'], 2)}-{fmt(pred['high'], 2)} over c's range" if cs else "n/a"},
        _lossless_row(b, ok, "sd_identical"),
    ]


def parallel_rows(stats: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """benchmark_parallel_prefill: overlap window, free tokens, acceptance, measured speedup, lossless."""
    ok = _ok(records)
    n = f"{len(ok)} samples"
    b = "benchmark_parallel_prefill"
    return [
        {"benchmark": b, "measure": "free draft tokens during the target's prefill / accepted",
         "value": f"{fmt(stats.get('free_draft_tokens_avg'), 1)} / {fmt(stats.get('accepted_free_tokens_avg'), 1)}",
         "n": n, "spread": fmt_spread(spread(r.get("free_draft_tokens") for r in ok), 1)},
        _mean_row(b, "acceptance rate (free tokens in the denominator)", "acceptance_rate", stats, ok),
        _mean_row(b, "speedup measured end to end (per sample)", "speedup", stats, ok, digits=2),
        _lossless_row(b, ok, "identical"),
    ]


def drafter_rows(token_stats: Mapping[str, Any] | None, feature: Mapping[str, Any] | None) -> list[dict]:
    """Each learned drafter next to raw EventGPT next-token drafting, teacher forced and live."""
    rows: list[dict] = []
    if token_stats:
        tf, live = token_stats.get("test_teacher_forced") or {}, token_stats.get("live") or {}
        base, ada = tf.get("baseline_draft_next_match"), tf.get("adapter_top1")
        rows.append(_compare("TokenAdapter", "teacher forced: top-1 on the test answers", base, ada,
                             f"{tf.get('num_positions')} positions, {tf.get('num_samples')} samples"))
        raw, adapter = live.get("raw") or {}, live.get("adapter") or {}
        al = live.get("aligned_metrics") or {}
        row = _compare("TokenAdapter", "LIVE speculation: acceptance rate (pooled)", raw.get("acceptance_rate"),
                       adapter.get("acceptance_rate"),
                       f"{live.get('num_samples')} samples ({raw.get('num_drafted')} vs "
                       f"{adapter.get('num_drafted')} drafted)")
        row["spread (per-sample std: raw / learned)"] = (f"{fmt(al.get('raw_acceptance_rate_std'))} / "
                                                         f"{fmt(al.get('aligned_acceptance_rate_std'))}")
        rows.append(row)
        rows.append(_compare("TokenAdapter", "LIVE: mean accepted length", raw.get("mean_accepted_length"),
                             adapter.get("mean_accepted_length"), f"{live.get('num_samples')} samples", digits=2))
    if feature:
        test = feature.get("test") or {}
        base = (token_stats or {}).get("test_teacher_forced", {}).get("baseline_draft_next_match")
        rows.append(_compare("L1 hidden adapter", "teacher forced: top-1 through the target's LM head", base,
                             test.get("top1"), f"{test.get('positions')} positions (same test samples)"))
        rows.append({"learned drafter": "L1 hidden adapter", "measure": "LIVE speculation",
                     "raw EventGPT drafting": "-", "learned": "not run in the demo", "verdict": "-", "n": "-"})
    for r in rows:
        r.setdefault("spread (per-sample std: raw / learned)", "")
    return rows


def _compare(name: str, measure: str, base: float | None, learned: float | None, n: str, digits: int = 3) -> dict:
    if base is None or learned is None:
        verdict = "n/a"
    else:
        verdict = "better than raw" if learned > base else ("same as raw" if learned == base else "WORSE than raw")
    return {"learned drafter": name, "measure": measure, "raw EventGPT drafting": fmt(base, digits),
            "learned": fmt(learned, digits), "verdict": verdict, "n": n}


def run_sizes(args: Any, inference_records: Sequence[Mapping[str, Any]], token_stats: Mapping[str, Any] | None
              ) -> str:
    """One line with the sizes of the run: samples, gamma, tokens, alignment data."""
    ok = _ok(inference_records)
    tokens = sum(int(r.get("videollava_num_tokens") or 0) for r in ok)
    text = (f"Run sizes: benchmarks on {len(ok)} test samples, gamma {args.gamma}, at most {args.max_new_tokens} "
            f"new tokens per answer ({tokens} target tokens in all).")
    if token_stats:
        data = token_stats.get("data") or {}
        tf = token_stats.get("test_teacher_forced") or {}
        text += (f" Alignment: {data.get('train_samples')} train + {data.get('val_samples')} validation samples "
                 f"(held-out train clips), {tf.get('num_samples')} test samples ({tf.get('num_positions')} target "
                 f"positions), {(token_stats.get('live') or {}).get('num_samples')} live samples, "
                 f"{token_stats.get('epochs_run')} epochs.")
    return text


def render_summary(header: Sequence[str], sizes: str, bench: Sequence[Mapping[str, Any]],
                   drafters: Sequence[Mapping[str, Any]], pngs: Sequence[str]) -> str:
    """The whole SUMMARY.md."""
    from common.results import markdown_table

    lines = ["# Demo summary", "", CPU_CAVEAT, "", *header, "", sizes, "",
             "## Benchmarks (raw EventGPT drafting)", "", markdown_table(bench),
             "value = mean over samples; spread = per-sample std (min-max). " + ACCEPTANCE_DEFINITION, "",
             "The predicted speedup rests on the acceptance of sequential speculation (the same in every run at "
             "temperature 0) and on c, a ratio of two CPU timings that moves between identical runs on a busy CPU "
             "(and the prediction with it), so it is shown over the range of c across this run's samples. It "
             "covers the decode phase only (no prefill, no verification overhead).", ""]
    if drafters:
        lines += ["## Learned drafters against raw EventGPT drafting (the strongest plain baseline)", "",
                  markdown_table(drafters),
                  "Teacher forced = the drafter's top-1 when fed the target's own answer; LIVE = real speculative "
                  "decoding, where a rejection ends the block. Trust LIVE.", ""]
    lines += ["## Plots", "", *[f"![{name}]({name})" for name in pngs], ""]
    return "\n".join(lines)
