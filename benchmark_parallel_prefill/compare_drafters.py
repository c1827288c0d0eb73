"""Every drafter in one harness, on the same samples, in one run: does the event modality add anything?

    python -m benchmark_parallel_prefill.compare_drafters [--dataset_dir D --eventgpt_path P --videollava_path P
        --max_samples N --gamma 5 --max_new_tokens 50 --token_adapter P --hidden_adapter P1,P5
        --eagle_head P --pool 2 --harness parallel --drafters eventgpt,eagle,... --output_dir O --task_name T]

Per sample: the target alone (stages 1-4 + greedy decode, timed; plus its reference output under
the verification numerics), then each drafter through the same engine, its output checked
against the reference (it must be identical):

- ``eventgpt``: raw EventGPT greedy tokens (``ModelDrafter``);
- ``token_adapter``: the TokenAdapter (``--token_adapter``, else the newest under token_alignment/task);
- ``L1``..``L5``: hidden-state adapters over EventGPT's states (``--hidden_adapter P1,P5``, named by level);
- ``eagle``: the EAGLE head over the target's own features (``--eagle_head``; same modality);
- ``pooled_xK``: the target itself with its video tokens ``K x K`` average-pooled (``--pool K``, 0 = off);
- ``hybrid``: EventGPT's free tokens during the target's prefill, then the EAGLE head;
  ``hybrid_L5``: the same with the L5 adapter (conditioned on EventGPT's features) after the switch.

``--harness parallel`` (default): drafters with a draft model (EventGPT-based ones, the pooled
self-draft) prefill concurrently with the target and draft free tokens in its prefill window
(``common.parallel.run_parallel``); ``sequential``: target prefill, draft prefill, then decoding.
The EAGLE head has no prefill of its own; the hybrids always run concurrently.

Reported per drafter (vLLM-style): draft acceptance rate, mean accepted length, per-token
acceptance ``a``, the measured cost ratio ``c`` (draft seconds per drafted token in the
decoding loop / the target's seconds per decode step, both from this run), the measured
wall-clock speedup vs the target alone (end to end, and of the decode phase), Leviathan's
prediction from the measured ``a`` and ``c``, and the lossless rate. Writes a run folder
(config.json, records.jsonl, results.json, RESULTS.md, speedup.png, acceptance.png); a rerun
with the same --task_name resumes per (drafter, sample).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from common.cli import add_common_args, add_retry_arg, non_negative_int
from common.flags import add_decode_args, add_token_adapter_flag, add_tree_args
from common.harness import Benchmark, exit_code, run_benchmark
from common.results import markdown_table, summarize

if TYPE_CHECKING:  # the heavy modules load where they are used, so --help needs no torch
    from common.compression import PooledFactory, PooledVideoLlava
    from common.speculative import SpecResult

STAGE = "benchmark_parallel_prefill"
SCRIPT = "compare_drafters"
TARGET = "target"
log = logging.getLogger(f"{STAGE}.{SCRIPT}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {STAGE}.{SCRIPT}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_retry_arg(parser)
    g = parser.add_argument_group("decoding")
    g.add_argument("--harness", choices=["parallel", "sequential"], default="parallel",
                   help="drafters with a draft model prefill concurrently with the target (parallel, default) "
                        "or after it (sequential)")
    add_decode_args(g, free_tokens=True)
    g = parser.add_argument_group("drafters")
    g.add_argument("--drafters", default=None,
                   help="comma list of drafters to run (default: every one available): eventgpt, token_adapter, "
                        "L1..L5, eagle, pooled_xK, hybrid, hybrid_L5")
    add_token_adapter_flag(g, "TokenAdapter checkpoint or run folder (default: the newest under "
                              "token_alignment/task; 'none' skips it)")
    g.add_argument("--hidden_adapter", metavar="PATH[,PATH...]", default=None,
                   help="hidden-state adapter checkpoints, comma-separated; each is named by its level (L1..L5). "
                        "The old NAME=PATH form still works")
    g.add_argument("--eagle_head", default=None, help="EAGLE head checkpoint (folder, or a training folder with best/)")
    g.add_argument("--pool", type=non_negative_int, default=2, help="pooled self-draft: K x K pooling of the video tokens (0: off)")
    add_tree_args(parser)  # adds eagle_tree / hybrid_tree beside the chain-drafting eagle / hybrid
    return parser


# ----------------------------------------------------------------------------- drafters

@dataclass
class Spec:
    """One drafter of the comparison: how to run it on a sample."""

    name: str
    kind: str  # draft_model | eagle | hybrid
    draft: Any = None  # the draft VLM (EventGPT or the pooled self-draft)
    factory: Any = None  # make_drafter(draft, draft_state, target)
    head: Any = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_named_paths(text: str | None) -> list[tuple[str | None, str]]:
    """``"P1,P5"`` -> [(None, "P1"), (None, "P5")] (named by level later); the old ``"L1=p1"`` -> [("L1", "p1")]."""
    out: list[tuple[str | None, str]] = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" in item:
            name, path = item.split("=", 1)
            out.append((name.strip(), path.strip()))
        else:
            out.append((None, item.strip()))
    if any(name is not None for name, _ in out):
        print("deprecated: --hidden_adapter NAME=PATH still works but will go; use --hidden_adapter PATH[,PATH...] "
              "(named by level)", file=sys.stderr)
    return out


def _pooled_factory(pooled: PooledVideoLlava) -> PooledFactory:
    from common.compression import PooledFactory

    return PooledFactory(pooled)


def build_specs(args: argparse.Namespace, draft: Any, target: Any) -> tuple[list[Spec], list[str]]:
    """The drafters this run can compare, and notes on those skipped (why)."""
    from common.compression import PooledVideoLlava
    from common.drafters import DrafterFactory
    from common.hybrid import HybridFactory

    specs: list[Spec] = [Spec("eventgpt", "draft_model", draft, DrafterFactory("eventgpt"),
                              description="raw EventGPT greedy tokens")]
    notes: list[str] = []
    # TokenAdapter
    path = args.token_adapter_path
    if path is None:
        from token_alignment.drafter import find_latest_adapter

        path = find_latest_adapter()
        if path is None:
            notes.append("token_adapter: skipped (no --token_adapter and none under token_alignment/task)")
    if path and str(path).lower() != "none":
        try:
            from token_alignment.drafter import load_token_adapter

            specs.append(Spec("token_adapter", "draft_model", draft,
                              DrafterFactory("token_adapter", adapter=load_token_adapter(path, target.device)),
                              description=f"TokenAdapter {path}"))
        except Exception as exc:  # an incompatible or broken checkpoint: report, compare the rest
            notes.append(f"token_adapter: skipped ({path}: {type(exc).__name__}: {exc})")
    # hidden-state adapters L1-L5
    l5 = None
    for given, apath in parse_named_paths(args.hidden_adapter):
        from feature_alignment.drafter import adapter_input_layers
        from feature_alignment.hidden_adapter import load_any_adapter

        adapter = load_any_adapter(apath, target.device)
        name = given or f"L{adapter.level}"
        if adapter.io_sizes != (draft.hidden_size, target.hidden_size):
            notes.append(f"{name}: skipped ({apath} maps {adapter.io_sizes[0]} -> {adapter.io_sizes[1]}, "
                         f"the models are {draft.hidden_size} -> {target.hidden_size})")
            continue
        specs.append(Spec(name, "draft_model", draft, DrafterFactory("hidden_adapter", adapter=adapter,
                                                                     hidden_layers=adapter_input_layers(adapter)),
                          description=f"hidden adapter level {adapter.level} {apath}"))
        if adapter.level == 5:
            l5 = adapter
    # EAGLE head over the target's own features
    head = None
    if args.eagle_head:
        from feature_alignment.eagle_head import load_eagle_head

        head = load_eagle_head(args.eagle_head, target)
        specs.append(Spec("eagle", "eagle", head=head, description=f"EAGLE head {args.eagle_head} "
                                                                   f"(layer {head.config.feature_layer})"))
    else:
        notes.append("eagle, hybrid: skipped (no --eagle_head; train one with feature_alignment.train_eagle_head)")
    # pooled self-draft
    if args.pool and args.pool > 0:
        pooled = PooledVideoLlava(target, args.pool)
        specs.append(Spec(f"pooled_x{args.pool}", "draft_model", pooled, _pooled_factory(pooled),
                          description=f"the target with {args.pool}x{args.pool}-pooled video tokens"))
    # hybrids
    if head is not None:
        specs.append(Spec("hybrid", "hybrid", draft, HybridFactory.eagle(head),
                          description="EventGPT free tokens, then the EAGLE head"))
    if l5 is not None:
        specs.append(Spec("hybrid_L5", "hybrid", draft, HybridFactory.l5(l5),
                          description="EventGPT free tokens, then the L5 adapter (EventGPT features)"))
    else:
        notes.append("hybrid_L5: skipped (no level-5 adapter in --hidden_adapter)")
    if args.drafters:
        wanted = [d.strip() for d in args.drafters.split(",") if d.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in specs}]
        if unknown:
            notes.append(f"requested but unavailable: {', '.join(unknown)}")
        specs = [s for s in specs if s.name in wanted]
    return specs, notes


# ----------------------------------------------------------------------------- running

def run_target(target: Any, sample: Any, max_new_tokens: int) -> dict[str, Any]:
    """The baseline: stages 1-4 and greedy decoding of the target by itself (timed)."""
    from common.pipeline import time_target_alone

    seconds, pre, gen = time_target_alone(target, sample, max_new_tokens)
    return {"wall_time": seconds, "token_ids": list(gen.tokens), "decode_seconds": gen.seconds,
            "decode_steps": gen.steps, "prompt_tokens": pre.state.prompt_length,
            "prefill_ms": 1000 * pre.times["stage4"], "stage_times": pre.times}


def _spec_fields(result: SpecResult, free: list[int]) -> dict[str, Any]:
    first = result.iterations[0][0] if result.iterations else 0
    loop_drafted = result.num_drafted - (first if free else 0)
    return {
        "token_ids": list(result.tokens), "iterations": [list(i) for i in result.iterations],
        "acceptance_rate": result.acceptance_rate, "mean_accepted_length": result.mean_accepted_length,
        "token_acceptance_probability": result.token_acceptance_probability,
        "draft_seconds": result.draft_seconds, "loop_drafted": loop_drafted, "verify_seconds": result.verify_seconds,
        "speculative_decode_time": result.total_seconds, "target_forwards": result.target_forwards,
        "draft_steps": result.draft_steps, "free_draft_tokens": len(free),
        "accepted_free_tokens": int(result.iterations[0][1]) if free and result.iterations else 0,
    }


def tree_specs(specs: list[Spec], args: argparse.Namespace) -> list[Spec]:
    """With --tree_topk/--tree_tokens: a ``<name>_tree`` copy of each tree-capable drafter (eagle, hybrid)."""
    from common.tree import TREE_DRAFTERS, tree_from_flags

    able = [s for s in specs if s.name in TREE_DRAFTERS]
    tree = tree_from_flags(args.tree_topk, args.tree_tokens, [s.name for s in able], args.tree_depth)
    if tree is None:
        return []
    return [replace(s, name=f"{s.name}_tree", extra={**s.extra, "tree": tree},
                    description=f"{s.description} drafting trees (top-{tree.topk}, {tree.tokens} tree tokens"
                                f"{f', depth <= {tree.depth}' if tree.depth else ''})")
            for s in able]


def run_spec(spec: Spec, target: Any, sample: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One drafter on one sample: wall time, the engine's accounting and the prefill sizes."""
    from common.concurrency import named_options
    from common.hybrid import run_hybrid
    from common.parallel import run_parallel, timed
    from common.pipeline import prefill_sample
    from common.speculative import speculative_generate
    from common.timing import sync, sync_current_stream

    gamma, new = args.gamma, args.max_new_tokens
    engine_sync = partial(sync, target.device)
    if spec.kind == "eagle":
        from feature_alignment.eagle_head import EagleTarget, make_eagle_drafter

        def run():
            proxy = EagleTarget(target, spec.head.config.feature_layer)
            pre = prefill_sample(proxy, sample)
            drafter = make_eagle_drafter(spec.head, None, proxy, pre.state,
                                         sync=partial(sync_current_stream, target.device))
            res = speculative_generate(proxy, pre.state, drafter, max_new_tokens=new, gamma=gamma, sync=engine_sync,
                                       tree=spec.extra.get("tree"))
            return pre, res

        seconds, (pre, res) = timed(run, target.device)
        return {"wall_time": seconds, **_spec_fields(res, []), "target_prefill_ms": 1000 * pre.times["stage4"],
                "draft_prompt_tokens": None, "draft_prefill_ms": None}
    if spec.kind == "hybrid" or args.harness == "parallel":
        if spec.kind == "hybrid":
            out = run_hybrid(spec.draft, target, sample, spec.factory, max_new_tokens=new, gamma=gamma,
                             max_free_tokens=args.max_free_tokens, tree=spec.extra.get("tree"))
        else:
            out = run_parallel(spec.draft, target, sample, spec.factory, max_new_tokens=new, gamma=gamma,
                               max_free_tokens=args.max_free_tokens,
                               concurrency=named_options(getattr(args, "concurrency", None)))
        fields = {"wall_time": out.wall_seconds, **_spec_fields(out.result, out.free_tokens),
                  "overlap_window_ms": 1000 * out.overlap_window,
                  "target_prefill_ms": 1000 * out.target.times["stage4"],
                  "draft_prompt_tokens": out.draft.state.prompt_length,
                  "draft_prefill_ms": 1000 * out.draft.times["stage4"]}
        drafter = getattr(out, "drafter", None)
        if drafter is not None:
            stats = drafter.stats
            fields.update(switched_at=stats.get("switched_at"), first_phase_tokens=stats.get("first_tokens"),
                          second_phase_tokens=stats.get("second_tokens"))
        return fields

    def run_seq():
        tgt = prefill_sample(target, sample)
        drf = prefill_sample(spec.draft, sample, hidden_layers=getattr(spec.factory, "hidden_layers", ()))
        drafter = spec.factory(spec.draft, drf.state, target)
        res = speculative_generate(target, tgt.state, drafter, max_new_tokens=new, gamma=gamma, sync=engine_sync)
        return tgt, drf, res

    seconds, (tgt, drf, res) = timed(run_seq, target.device)
    return {"wall_time": seconds, **_spec_fields(res, []), "target_prefill_ms": 1000 * tgt.times["stage4"],
            "draft_prompt_tokens": drf.state.prompt_length, "draft_prefill_ms": 1000 * drf.times["stage4"]}


def _base_record(sample: Any, name: str) -> dict[str, Any]:
    from common.data import sample_fields

    return {**sample_fields(sample), "drafter": name}


def process_target(target: Any, sample: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The target's record: timed baseline (fastest numerics) and its reference under verification numerics."""
    from common.models.decoding import counting_routes
    from common.pipeline import lossless_numerics, prefill_sample
    from common.speculative import autoregressive_generate

    record = _base_record(sample, TARGET)
    with counting_routes(target) as routes:
        alone = run_target(target, sample, args.max_new_tokens)
    alone["target_routes"] = dict(routes)
    with lossless_numerics(target, args) as step:
        if step:
            state = prefill_sample(target, sample).state
            reference = list(autoregressive_generate(target, state, max_new_tokens=args.max_new_tokens).tokens)
        else:
            reference = alone["token_ids"]
    record.update(alone)
    record.update(videollava=target.decode_text(alone["token_ids"]), videollava_token_ids=alone["token_ids"],
                  videollava_time=alone["wall_time"], reference_token_ids=reference)
    return record


def process_drafter(spec: Spec, target: Any, sample: Any, args: argparse.Namespace,
                    target_record: dict[str, Any]) -> dict[str, Any]:
    from common.models.decoding import counting_routes
    from common.pipeline import lossless_numerics

    record = _base_record(sample, spec.name)
    with lossless_numerics(target, args), counting_routes(target) as routes:
        record.update(run_spec(spec, target, sample, args))
    record["target_routes"] = dict(routes)  # e.g. {"graph": 20}; "eager_tree:<why>" names a tree verify run eagerly
    reference = target_record["reference_token_ids"]
    record["identical"] = record["token_ids"] == reference
    record["identical_to_fastest"] = record["token_ids"] == target_record["token_ids"]
    record["speedup"] = target_record["wall_time"] / record["wall_time"] if record["wall_time"] else None
    record["text"] = target.decode_text(record["token_ids"])
    if not record["identical"]:
        log.warning("%s on %s: output differs from the target's own (first %d tokens agree)", spec.name, sample.id,
                    next((i for i, (a, b) in enumerate(zip(record["token_ids"], reference)) if a != b),
                         min(len(reference), len(record["token_ids"]))))
    return record


# ----------------------------------------------------------------------------- statistics

def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def compute_statistics(records: list[dict[str, Any]], names: list[str], gamma: int) -> dict[str, Any]:
    """Per drafter: pooled vLLM metrics, measured c, measured and predicted speedups, lossless rate."""
    from common.speculative import SpecResult, aggregate_metrics, predicted_speedup

    targets = {r["id"]: r for r in records if r["drafter"] == TARGET and "error" not in r}
    stats: dict[str, Any] = {"gamma": gamma, "num_samples": len(targets),
                             "num_failed": sum(1 for r in records if r["drafter"] == TARGET and "error" in r)}
    if not targets:
        return stats
    t_steps = sum(r["decode_steps"] for r in targets.values())
    t_step_s = sum(r["decode_seconds"] for r in targets.values()) / t_steps if t_steps else None
    stats["target"] = {"samples": len(targets), "decode_ms_per_step": 1000 * t_step_s if t_step_s else None,
                       "prompt_tokens_avg": _mean(r["prompt_tokens"] for r in targets.values()),
                       "prefill_ms_avg": _mean(r["prefill_ms"] for r in targets.values()),
                       "prefill_ms_std": summarize(r["prefill_ms"] for r in targets.values())["std"],
                       "wall_time_avg": _mean(r["wall_time"] for r in targets.values()),
                       "wall_time_std": summarize(r["wall_time"] for r in targets.values())["std"]}
    per: dict[str, Any] = {}
    for name in names:
        rows = [r for r in records if r["drafter"] == name and r["id"] in targets and "error" not in r]
        if not rows:
            continue
        pooled = aggregate_metrics([SpecResult.from_record(r) for r in rows])
        drafted = sum(r["loop_drafted"] for r in rows)
        draft_s = sum(r["draft_seconds"] for r in rows)
        c = (draft_s / drafted) / t_step_s if drafted and t_step_s else None
        a = pooled.get("token_acceptance_probability")
        base = sum(targets[r["id"]]["wall_time"] for r in rows)
        base_decode = sum(targets[r["id"]]["decode_seconds"] for r in rows)
        per[name] = {
            "samples": len(rows),
            "lossless_rate": sum(bool(r["identical"]) for r in rows) / len(rows),
            "identical_to_fastest_rate": sum(bool(r["identical_to_fastest"]) for r in rows) / len(rows),
            "acceptance_rate": pooled["acceptance_rate"], "mean_accepted_length": pooled["mean_accepted_length"],
            "token_acceptance_probability": a, "per_position_acceptance": pooled["per_position_acceptance"],
            "cost_ratio_c": c, "draft_ms_per_token": 1000 * draft_s / drafted if drafted else None,
            "speedup_measured": base / sum(r["wall_time"] for r in rows),
            "speedup_std": summarize(targets[r["id"]]["wall_time"] / r["wall_time"] for r in rows)["std"],
            "decode_speedup_measured": base_decode / sum(r["speculative_decode_time"] for r in rows),
            "speedup_predicted": predicted_speedup(a, gamma, c) if a is not None and c is not None else None,
            "free_draft_tokens_avg": _mean(r.get("free_draft_tokens") for r in rows),
            "accepted_free_tokens_avg": _mean(r.get("accepted_free_tokens") for r in rows),
            "draft_prompt_tokens_avg": _mean(r.get("draft_prompt_tokens") for r in rows),
            "draft_prefill_ms_avg": _mean(r.get("draft_prefill_ms") for r in rows),
            "draft_prefill_ms_std": summarize(r.get("draft_prefill_ms") for r in rows)["std"],
            "free_draft_tokens_std": summarize(r.get("free_draft_tokens") for r in rows)["std"],
            "target_prefill_ms_avg": _mean(r.get("target_prefill_ms") for r in rows),
            "pooled": pooled,
        }
        if any("switched_at" in r for r in rows):
            per[name]["switched_at_avg"] = _mean(r.get("switched_at") for r in rows)
    stats["drafters"] = per
    return stats


TABLE_COLUMNS = [("drafter", "drafter"), ("samples", "samples"), ("lossless_rate", "lossless"),
                 ("acceptance_rate", "acceptance rate"), ("mean_accepted_length", "mean accepted length"),
                 ("token_acceptance_probability", "a"), ("cost_ratio_c", "c (measured)"),
                 ("speedup_measured", "speedup (measured)"), ("decode_speedup_measured", "decode speedup (measured)"),
                 ("speedup_predicted", "Leviathan prediction"), ("free_draft_tokens_avg", "free tokens"),
                 ("free_draft_tokens_std", "free tokens std"),
                 ("accepted_free_tokens_avg", "accepted free"), ("draft_prompt_tokens_avg", "draft prompt tokens"),
                 ("draft_prefill_ms_avg", "draft prefill ms"), ("draft_prefill_ms_std", "draft prefill ms std")]


def table_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, s in stats.get("drafters", {}).items():
        rows.append({label: (name if key == "drafter" else s.get(key)) for key, label in TABLE_COLUMNS})
    return rows


def render_markdown(stats: dict[str, Any], specs: list[Spec], notes: list[str], argv: list[str], run_name: str,
                    args: argparse.Namespace) -> str:
    lines = [f"# compare_drafters: {run_name}", "", f"Command: `python -m {STAGE}.{SCRIPT} {' '.join(argv)}`", "",
             f"Samples: {stats['num_samples']} (failed: {stats['num_failed']}); gamma {args.gamma}; "
             f"max_new_tokens {args.max_new_tokens}; harness {args.harness}.", ""]
    target = stats.get("target")
    if target:
        lines += [f"Target alone: decode {target['decode_ms_per_step']:.2f} ms/step, prompt "
                  f"{target['prompt_tokens_avg']:.0f} tokens, prefill {target['prefill_ms_avg']:.2f} ms "
                  f"(std {target['prefill_ms_std']:.2f}), end to end {1000 * target['wall_time_avg']:.1f} ms per sample "
                  f"(std {1000 * target['wall_time_std']:.1f}; n = {target['samples']}); torch threads per model lane: "
                  f"{stats.get('torch_threads')}.", "",
                  "Means over samples: free tokens and draft prefill ms carry their std; rates and speedups are "
                  "pooled over the n samples of each row.", ""]
    rows = table_rows(stats)
    if rows:
        lines += [markdown_table(rows, [label for _, label in TABLE_COLUMNS], floatfmt=".3f"), ""]
    lines += ["- lossless: share of samples whose output equals the target's own (reference under the "
              "verification numerics); it must be 1.",
              "- acceptance rate = accepted / drafted (vLLM); mean accepted length = 1 + accepted / verify steps; "
              "a = accepted / (accepted + rejections), the per-token rate for Leviathan's formula.",
              "- c = draft seconds per drafted token in the decoding loop (free tokens excluded) / the target's "
              "seconds per decode step, both measured in this run.",
              "- speedup (measured) = target-alone wall time (stages 1-4 + decode) / the drafter's wall time, "
              "summed over samples; decode speedup compares the decode phases only. The Leviathan prediction "
              "(decode phase, from the measured a and c) ignores prefill, overlap and verification overhead.",
              "- free tokens: drafted during the target's prefill (parallel harness); draft prompt tokens / "
              "prefill ms: the draft model's own prompt (the pooled self-draft's savings vs the target's).", ""]
    lines += ["Drafters:", ""] + [f"- `{s.name}`: {s.description}" for s in specs] + [""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["Plots: speedup.png (measured end-to-end speedup per drafter), acceptance.png.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

class DrafterComparison(Benchmark):
    """Per sample: the target alone, then every drafter (one record each, resumed per (drafter, sample))."""

    unit_field = "drafter"

    def __init__(self, target: Any, specs: list[Spec], notes: list[str], args: argparse.Namespace, mode: str,
                 argv: list[str]):
        self.target, self.specs, self.notes, self.args, self.mode, self.argv = target, specs, notes, args, mode, argv
        self.event_frames = next((s.draft.num_event_frames for s in specs if hasattr(s.draft, "num_event_frames")),
                                 None)
        self.started = time.perf_counter()

    def units(self, sample: Any) -> list[str]:
        return [TARGET] + [s.name for s in self.specs]

    def base_record(self, sample: Any, unit: str) -> dict[str, Any]:
        return _base_record(sample, unit)

    def warmup(self, sample: Any, steps: int) -> None:
        if steps:
            ref = process_target(self.target, sample, self.args)
            for spec in self.specs:
                for _ in range(steps):
                    process_drafter(spec, self.target, sample, self.args, ref)

    def process(self, sample: Any, unit: str, done) -> dict[str, Any] | None:
        if unit == TARGET:
            return process_target(self.target, sample, self.args)
        target_record = done.get((TARGET, str(sample.id)))
        if target_record is None or "error" in target_record:
            return None  # no baseline for this sample: its failure is recorded once, under the target
        spec = next(s for s in self.specs if s.name == unit)
        return process_drafter(spec, self.target, sample, self.args, target_record)

    def statistics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        stats = compute_statistics(records, [s.name for s in self.specs], self.args.gamma)
        stats.update(decode_mode=self.mode, harness=self.args.harness, notes=self.notes,
                     device=str(self.target.device), seconds=time.perf_counter() - self.started,
                     drafter_descriptions={s.name: s.description for s in self.specs})
        return stats

    def render(self, stats, records, run) -> str:
        return render_markdown(stats, self.specs, self.notes, self.argv, run.path.name, self.args)

    def finish(self, stats, records, run) -> None:
        from common.plots import plot_bars

        per = stats.get("drafters", {})
        if per:
            plot_bars({n: s["speedup_measured"] for n, s in per.items()}, run.path / "speedup.png",
                      title=f"Measured end-to-end speedup vs target alone (gamma {self.args.gamma}; error bars: "
                            "per-sample std)", ylabel="speedup (x)", ref=1.0,
                      errors={n: s.get("speedup_std") for n, s in per.items()})
            plot_bars({n: s["acceptance_rate"] for n, s in per.items()}, run.path / "acceptance.png",
                      title="Draft acceptance rate", ylabel="accepted / drafted")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # before the heavy imports: --help prints at once
    from common.compression import PooledVideoLlava
    from common.pipeline import check_context, configure_decode, load_pair, prepare_benchmark, tree_tokens

    lanes = 2 if args.harness == "parallel" else 1  # on a CPU each concurrent model gets its share of the cores
    dataset_dir, samples, settings = prepare_benchmark(STAGE, args, argv, default_task="compare_drafters",
                                                       lanes=lanes)

    def make() -> DrafterComparison:
        draft, target = load_pair(args, dataset_dir)
        for vlm in (draft, target):
            check_context(vlm, args.max_new_tokens)
        specs, notes = build_specs(args, draft, target)
        specs += tree_specs(specs, args)
        models = [draft, target] + [s.draft for s in specs if isinstance(s.draft, PooledVideoLlava)]
        mode = configure_decode(models, args.decode_mode, max_length=4096, gamma=args.gamma,
                                vision_graphs=not args.eager_vision, tree_tokens=tree_tokens(args))
        for note in notes:
            log.info("%s", note)
        log.info("decode mode %s; drafters: %s", mode, ", ".join(s.name for s in specs))
        return DrafterComparison(target, specs, notes, args, mode, argv)

    out = run_benchmark(settings, samples, make)
    rows = table_rows(out["statistics"])
    if rows:
        log.info("\n%s", markdown_table(rows, [label for _, label in TABLE_COLUMNS], floatfmt=".3f"))
    return {**out, "table": rows}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main, exit_code=exit_code)
