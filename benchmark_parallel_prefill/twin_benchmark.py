"""The 7B twin, end to end: every drafter, against our target alone and HF ``generate``.

    python -m benchmark_parallel_prefill.twin_benchmark [--shape 7b|small] [--num_short 50 --num_long 50
        --num_free 10] [--twin_dir data/twin_7b --data_dir data/twin_data --output_dir results/twin]
        [--eventgpt_path P --videollava_path P] [--token_adapter P --hidden_adapter P1,P5 --eagle_head P |
        --drafters_json F] [--tree_topk K --tree_tokens N] [--device auto --num_workers 16 --no_hf]

One command, four steps:

1. test data: ``--num_short`` clips asked short questions (the top 50 minus the long ones, in turn) and
   ``--num_long`` clips made with ``--long_answers`` and asked the long questions ("What are the key
   elements in this scene?", ...); one sample per clip;
2. the pair (``--eventgpt_path/--videollava_path``, default the shipped one) widened to ``--shape``
   (``scripts.widen_pair``; bf16 for 7b) into ``--twin_dir``, skipped when a complete twin of the same
   pair is there; the trained drafters of that pair given by ``--token_adapter``, ``--hidden_adapter``,
   ``--eagle_head`` (or ``--drafters_json``, the file ``scripts.train_drafters`` writes) widened with it into
   ``--twin_dir``/drafters, rewritten every run (``common.drafters.widen``: on the twin each proposes exactly
   what it proposes on the small pair);
3. per set, ``compare_drafters`` on the twin (target alone on our engine; raw EventGPT drafting
   concurrently with the target's prefill; the pooled self-draft; and with trained drafters every one
   ``compare_drafters`` builds from them: ``token_adapter``, ``L1``..``L5``, ``eagle``, ``hybrid``,
   ``hybrid_L5``, and ``eagle_tree``/``hybrid_tree`` with ``--tree_topk/--tree_tokens``),
   ``--max_new_tokens`` 128 (the long answers whole); then EventGPT free-tokens-only (``benchmark_parallel_prefill
   --gamma_after_prefill 0``, which also draws the timeline, copied to ``--output_dir``/timeline.png) on
   ``--num_free`` long samples;
4. transformers' ``generate`` with a static cache on the same target weights and the same prompts
   (the twin's masked visual prefix given as a left-padding attention mask of zeros).

Writes ``--output_dir``/twin_results.json and TWIN_RESULTS.md: per set and drafter, speedup vs our
target alone and vs HF generate, acceptance, mean accepted length, Leviathan's prediction, lossless rate,
the target's mean answer length, and Leviathan's curve at the measured costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.flags import add_tree_args

STAGE = "benchmark_parallel_prefill"
log = logging.getLogger(f"{STAGE}.twin_benchmark")
SETS = ("short", "long")
CURVE_ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class TwinConfig:
    """What one twin benchmark run does."""

    shape: str = "7b"
    twin_dir: Path = Path("data/twin_7b")
    data_dir: Path = Path("data/twin_data")
    output_dir: Path = Path("results/twin")
    num_short: int = 50
    num_long: int = 50
    num_free: int = 10
    max_new_tokens: int = 128
    gamma: int = 5
    pool: int = 2
    device: str = "auto"
    num_workers: int = 2
    hf: bool = True
    warmup_steps: int = 1
    eventgpt_path: str | None = None  # the small pair to widen (None: the shipped one)
    videollava_path: str | None = None
    drafters: Any = None  # common.drafters.widen.DrafterSources of that pair (None: no trained drafters)
    tree_topk: int | None = None
    tree_tokens: int | None = None
    tree_depth: int | None = None  # --tree_depth (None: as deep as the node budget allows)
    only: str | None = None  # compare_drafters --drafters (None: every one it builds)


# ----------------------------------------------------------------------------- step 1: data

def rewrite_questions(dataset_dir: Path, questions: list[str]) -> None:
    """Give clip i question ``questions[i % len]`` with its ground-truth answer (one sample per clip)."""
    from common.data import INDEX_NAME
    from common.results import atomic_write_text
    from common.synthetic import answer_question

    index = dataset_dir / INDEX_NAME
    entries = json.loads(index.read_text())
    for i, entry in enumerate(sorted(entries, key=lambda e: e["id"])):
        question = questions[i % len(questions)]
        gt = json.loads((dataset_dir / entry["ground_truth"]).read_text())
        entry["conversations"] = [{"from": "human", "value": f"<event>\n{question}"},
                                  {"from": "gpt", "value": answer_question(question, gt)}]
    atomic_write_text(index, json.dumps(entries, indent=1) + "\n")


def short_questions() -> list[str]:
    """The top questions that are not long-answer questions, most frequent first."""
    from common.synthetic import LONG_QUESTIONS, load_top_questions

    long_keys = {q.lower() for q in LONG_QUESTIONS}
    return [q["question"] for q in load_top_questions() if q["question"].lower() not in long_keys]


def make_question_set(folder: Path, num: int, split: str, seed: int, questions: list[str], num_workers: int,
                      extra: list[str] = (), size: tuple[int, int] = (320, 240)) -> Path:
    """``num`` synthetic clips in ``folder``, clip i asked ``questions[i % len]``; reused when an earlier run
    made the same set (``question_set.json``), made afresh when it made another (rewritten questions cannot
    be merged with new clips), resumed when it was interrupted."""
    from common.results import atomic_write_json
    from scripts.make_synthetic_dataset import main as make_dataset

    marker = folder / "question_set.json"
    want = {"num": num, "split": split, "seed": seed, "extra": list(extra), "size": list(size),
            "questions": list(questions)}
    if marker.is_file():
        if json.loads(marker.read_text()) == want:
            return folder
        shutil.rmtree(folder)
    make_dataset(["--output_dir", str(folder), "--num_clips", str(num), "--split", split, "--seed", str(seed),
                  "--width", str(size[0]), "--height", str(size[1]), "--num_workers", str(num_workers), *extra])
    rewrite_questions(folder, list(questions))
    atomic_write_json(marker, want)
    return folder


def make_twin_data(data_dir: Path, num_short: int, num_long: int, num_workers: int) -> dict[str, Path]:
    """The short- and long-question test sets (320x240, 1 s clips, held-out seeds)."""
    from common.synthetic import LONG_QUESTIONS

    plan = {"long": (num_long, 2000, ["--long_answers"], list(LONG_QUESTIONS)),  # long first: the goal's set
            "short": (num_short, 1000, [], short_questions())}
    return {name: make_question_set(data_dir / name, n, "test", seed, questions, num_workers, extra)
            for name, (n, seed, extra, questions) in plan.items() if n > 0}


# ----------------------------------------------------------------------------- step 2: the twin

def stale_reason(summary: dict[str, Any], shape: str, sources: dict[str, Path]) -> str | None:
    """Why a finished twin is not the twin of ``sources`` at ``shape`` (None: it is)."""
    from common.models.widen import source_fingerprint

    if summary.get("shape") != shape:
        return f"the twin there has shape {summary.get('shape')}, not {shape}"
    for kind, path in sources.items():
        made = summary.get(kind, {})
        if Path(made.get("source", "")).resolve() != path.resolve():
            return f"its {kind} was widened from {made.get('source')}, not {path}"
        if made.get("source_fingerprint") not in (None, source_fingerprint(path)):
            return f"{path} changed since the twin was widened"
    return None


def twin_complete(twin_dir: Path) -> bool:
    """A finished widen_pair output: the summary and both models' configs and weights."""
    if not (twin_dir / "widen_pair.json").is_file():
        return False
    return all((twin_dir / k / "config.json").is_file() and any((twin_dir / k).glob("*.safetensors"))
               for k in ("eventgpt", "videollava"))


def ensure_twin(twin_dir: Path, shape: str, eventgpt_path: str | None = None,
                videollava_path: str | None = None) -> dict[str, Any]:
    """Widen the pair (default: the shipped one) into ``twin_dir`` (bf16 for 7b, float32 for small) unless
    a complete twin of the same checkpoints (path and content) and shape is there; a stale one is replaced."""
    from common.defaults import resolve_model_paths
    from common.models.widen import widen_pair

    egpt, vllava = resolve_model_paths(eventgpt_path, videollava_path)
    if twin_complete(twin_dir):
        summary = json.loads((twin_dir / "widen_pair.json").read_text())
        stale = stale_reason(summary, shape, {"eventgpt": egpt, "videollava": vllava})
        if not stale:
            return {**summary, "reused": True, "seconds": 0.0}
        log.info("%s: %s; widening again", twin_dir, stale)
    for kind in ("eventgpt", "videollava"):  # an interrupted earlier widening, or a stale twin
        shutil.rmtree(twin_dir / kind, ignore_errors=True)
    started = time.perf_counter()
    summary = widen_pair(twin_dir, egpt, vllava, shape_name=shape,
                         dtype=torch.bfloat16 if shape == "7b" else torch.float32)
    return {**summary, "reused": False, "seconds": time.perf_counter() - started}


def ensure_twin_drafters(cfg: TwinConfig) -> dict[str, Any]:
    """The trained drafters widened into ``twin_dir``/drafters (rewritten every run: seconds)."""
    from common.defaults import resolve_model_paths
    from common.drafters.widen import prepare_drafters, write_drafters
    from common.models.widen import prepare

    egpt, vllava = resolve_model_paths(cfg.eventgpt_path, cfg.videollava_path)
    jobs = prepare_drafters(cfg.drafters, prepare("eventgpt", egpt, cfg.shape), prepare("videollava", vllava, cfg.shape))
    shutil.rmtree(cfg.twin_dir / "drafters", ignore_errors=True)
    return write_drafters(jobs, cfg.twin_dir)


def drafter_args(widened: dict[str, Any] | None, cfg: TwinConfig) -> list[str]:
    """compare_drafters flags: the widened drafters (then every drafter it builds), or only those needing no training."""
    if not widened:
        return ["--drafters", cfg.only or f"eventgpt,pooled_x{cfg.pool}", "--token_adapter", "none"]
    out = ["--token_adapter", widened["token_adapter"]["path"] if "token_adapter" in widened else "none"]
    if cfg.only:
        out += ["--drafters", cfg.only]
    if widened["hidden_adapter"]:
        out += ["--hidden_adapter", ",".join(e["path"] for e in widened["hidden_adapter"])]
    if "eagle_head" in widened:
        out += ["--eagle_head", widened["eagle_head"]["path"]]
    if cfg.tree_topk is not None or cfg.tree_tokens is not None:
        out += ["--tree_topk", str(cfg.tree_topk), "--tree_tokens", str(cfg.tree_tokens)]
    if cfg.tree_depth is not None:
        out += ["--tree_depth", str(cfg.tree_depth)]
    return out


# ----------------------------------------------------------------------------- step 3: our engine

def _model_args(cfg: TwinConfig) -> list[str]:
    return ["--eventgpt_path", str(cfg.twin_dir / "eventgpt"), "--videollava_path", str(cfg.twin_dir / "videollava"),
            "--device", cfg.device, "--gamma", str(cfg.gamma), "--max_new_tokens", str(cfg.max_new_tokens),
            "--warmup_steps", str(cfg.warmup_steps), "--no_resume"]


def run_compare(name: str, dataset_dir: Path, num: int, cfg: TwinConfig,
                widened: dict[str, Any] | None = None) -> dict[str, Any]:
    """compare_drafters on the twin: target alone, raw EventGPT (concurrent), the pooled self-draft, and the
    widened trained drafters with every drafter compare_drafters builds from them."""
    from benchmark_parallel_prefill.compare_drafters import main as compare_main

    return compare_main(["--dataset_dir", str(dataset_dir), "--max_samples", str(num), *_model_args(cfg),
                         *drafter_args(widened, cfg), "--pool", str(cfg.pool), "--harness", "parallel",
                         "--output_dir", str(cfg.output_dir), "--task_name", f"twin_{name}"])


def run_free_only(dataset_dir: Path, num: int, cfg: TwinConfig) -> dict[str, Any]:
    """EventGPT's free tokens only (then plain decoding), with the run's timeline plot."""
    from benchmark_parallel_prefill.benchmark_parallel_prefill import main as parallel_main

    return parallel_main(["--dataset_dir", str(dataset_dir), "--max_samples", str(num), *_model_args(cfg),
                          "--gamma_after_prefill", "0", "--output_dir", str(cfg.output_dir),
                          "--task_name", "twin_free_only"])


# ----------------------------------------------------------------------------- step 4: HF generate

def hf_generate_pass(dataset_dir: Path, num: int, cfg: TwinConfig) -> list[dict[str, Any]]:
    """Stages 1-3 on our path, then HF ``generate`` (static cache, greedy) on the twin target: per-sample
    wall time and tokens. The masked visual prefix becomes left padding (attention mask 0)."""
    from transformers import StaticCache

    from common.data import ClipDataset, default_frame_cache
    from common.models.loader import load_vlm
    from common.parallel import timed

    vlm = load_vlm("videollava", cfg.twin_dir / "videollava", device=cfg.device,
                   frame_cache=default_frame_cache(dataset_dir))
    samples = list(ClipDataset(dataset_dir))[:num]
    cache: list[Any] = [None, 0]  # the static cache, its length

    def run(sample):
        embeds = vlm.padded_prompt_embeds(vlm.encode(sample), sample.question)[None]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=vlm.device)
        mask[:, : vlm.visual_pad_tokens] = 0
        need = embeds.shape[1] + cfg.max_new_tokens + 1
        if cache[0] is None or cache[1] < need:
            cache[:] = [StaticCache(config=vlm.model.config, max_cache_len=need + 64), need + 64]
        cache[0].reset()
        out = vlm.model.generate(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache[0],
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 eos_token_id=vlm.eos_token_id, pad_token_id=vlm.eos_token_id)
        return [int(t) for t in out[0].tolist()]

    records = []
    with torch.no_grad():
        for _ in range(max(1, cfg.warmup_steps) + (1 if vlm.device.type == "cuda" else 0)):
            timed(lambda: run(samples[0]), vlm.device)  # first calls compile the decode step on CUDA
        for sample in samples:
            seconds, tokens = timed(lambda s=sample: run(s), vlm.device)
            records.append({"id": str(sample.id), "question": sample.question, "wall_time": seconds,
                            "token_ids": tokens})
    return records


# ----------------------------------------------------------------------------- summary

def leviathan_with_verify(a: float, gamma: int, c: float, verify_ratio: float) -> float:
    """Leviathan's decode-phase speedup with the verify pass costing ``verify_ratio`` decode steps."""
    from common.speculative import expected_tokens_per_step

    return expected_tokens_per_step(a, gamma) / (gamma * c + verify_ratio)


def _records(run_dir: str) -> list[dict[str, Any]]:
    from common.results import read_jsonl

    return read_jsonl(Path(run_dir) / "records.jsonl")


def summed_routes(records: list[dict[str, Any]]) -> dict[str, int]:
    """The target's forwards per route (``graph``, ``graph_tree``, ``eager``, ``eager_tree:<why>``) over records."""
    total: dict[str, int] = {}
    for r in records:
        for route, n in (r.get("target_routes") or {}).items():
            total[route] = total.get(route, 0) + int(n)
    return dict(sorted(total.items()))


def summarize_set(compare: dict[str, Any], hf: list[dict[str, Any]]) -> dict[str, Any]:
    """Per drafter: the compare_drafters figures plus speedup vs HF generate; target and HF baselines."""
    recs = _records(compare["run_dir"])
    targets = {str(r["id"]): r for r in recs if r["drafter"] == "target" and "error" not in r}
    hf_by_id = {r["id"]: r for r in hf}
    stats = compare["statistics"]
    t_ms = stats["target"]["decode_ms_per_step"]
    lengths = [len(r["token_ids"]) for r in targets.values()]
    out: dict[str, Any] = {"samples": len(targets), "target": dict(stats["target"]),
                           "target_answer_tokens_mean": sum(lengths) / len(lengths) if lengths else None,
                           "target_answer_tokens_max": max(lengths) if lengths else None,
                           "target_routes": summed_routes(list(targets.values())), "drafters": {}}
    both = [i for i in targets if i in hf_by_id]
    if both:
        hf_wall = sum(hf_by_id[i]["wall_time"] for i in both)
        out["hf"] = {"samples": len(both), "wall_time_avg": hf_wall / len(both),
                     "tokens_equal_engine_rate": sum(hf_by_id[i]["token_ids"] == targets[i]["token_ids"]
                                                     for i in both) / len(both),
                     "target_speedup_vs_hf": hf_wall / sum(targets[i]["wall_time"] for i in both)}
    for name, s in stats.get("drafters", {}).items():
        rows = [r for r in recs if r["drafter"] == name and "error" not in r and str(r["id"]) in targets]
        verify = sum(r["verify_seconds"] for r in rows) / max(1, sum(r["target_forwards"] for r in rows))
        row = {k: s.get(k) for k in ("samples", "lossless_rate", "acceptance_rate", "mean_accepted_length",
                                     "token_acceptance_probability", "cost_ratio_c", "speedup_measured",
                                     "speedup_std", "decode_speedup_measured", "speedup_predicted",
                                     "free_draft_tokens_avg", "accepted_free_tokens_avg")}
        row["verify_ratio"] = 1000 * verify / t_ms if t_ms else None
        row["target_routes"] = summed_routes(rows)
        hf_rows = [r for r in rows if str(r["id"]) in hf_by_id]
        if hf_rows:
            row["speedup_vs_hf"] = (sum(hf_by_id[str(r["id"])]["wall_time"] for r in hf_rows)
                                    / sum(r["wall_time"] for r in hf_rows))
        out["drafters"][name] = row
    return out


def summarize_free_only(result: dict[str, Any], hf: list[dict[str, Any]]) -> dict[str, Any]:
    """The free-tokens-only run in the same row format (its own target-alone baseline)."""
    stats = result.get("statistics", result)
    row = {"samples": stats.get("num_samples"), "lossless_rate": stats.get("lossless_rate"),
           "speedup_measured": stats.get("speedup_measured"), "speedup_std": stats.get("speedup_std"),
           "free_draft_tokens_avg": stats.get("free_draft_tokens_avg"),
           "accepted_free_tokens_avg": stats.get("accepted_free_tokens_avg"),
           "acceptance_rate": stats.get("pooled", {}).get("acceptance_rate") if isinstance(stats.get("pooled"),
                                                                                              dict) else None}
    run_dir = result.get("run_dir")
    if run_dir and hf:
        hf_by_id = {r["id"]: r for r in hf}
        rows = [r for r in _records(run_dir) if "error" not in r and str(r["id"]) in hf_by_id]
        if rows:
            row["speedup_vs_hf"] = (sum(hf_by_id[str(r["id"])]["wall_time"] for r in rows)
                                    / sum(r["parallel_time"] for r in rows))
    return row


def leviathan_curve(sets: dict[str, Any], gamma: int) -> list[dict[str, Any]]:
    """Leviathan's speedup (verify cost included) at the measured c and verify ratio of each drafter."""
    rows = []
    for set_name, summary in sets.items():
        for name, d in summary["drafters"].items():
            c, v = d.get("cost_ratio_c"), d.get("verify_ratio")
            if c is None or v is None:
                continue
            row = {"set": set_name, "drafter": name, "c": c, "verify ratio": v}
            row.update({f"a={a}": leviathan_with_verify(a, gamma, c, v) for a in CURVE_ACCEPTANCE})
            rows.append(row)
    for c in (0.05, 0.1, 0.25):  # cheap heads (EAGLE-like) at a verify step costing one decode step
        rows.append({"set": "(what-if)", "drafter": f"c={c}", "c": c, "verify ratio": 1.0,
                     **{f"a={a}": leviathan_with_verify(a, gamma, c, 1.0) for a in CURVE_ACCEPTANCE}})
    return rows


TABLE = [("speedup_measured", "speedup vs our target alone"), ("speedup_vs_hf", "speedup vs HF generate"),
         ("acceptance_rate", "acceptance rate"), ("mean_accepted_length", "mean accepted length"),
         ("cost_ratio_c", "c"), ("verify_ratio", "verify / decode"), ("speedup_predicted", "Leviathan prediction"),
         ("lossless_rate", "lossless"), ("free_draft_tokens_avg", "free tokens"), ("samples", "n")]


def render_markdown(summary: dict[str, Any], command: str) -> str:
    """TWIN_RESULTS.md: one table per set, the baselines, the curve."""
    from common.results import markdown_table

    lines = ["# The twin benchmark", "", f"Command: `{command}`", "",
             f"Twin: shape {summary['twin'].get('shape')} ({'reused' if summary['twin'].get('reused') else 'widened'}"
             f" in {summary['twin'].get('seconds', 0):.0f} s); device {summary['device']}; gamma {summary['gamma']}; "
             f"max_new_tokens {summary['max_new_tokens']}.", ""]
    for set_name, s in summary["sets"].items():
        t, hf = s["target"], s.get("hf", {})
        lines += [f"## {set_name} questions ({s['samples']} samples)", "",
                  f"Target alone (our engine): {1000 * t['wall_time_avg']:.1f} ms per sample, decode "
                  f"{t['decode_ms_per_step']:.2f} ms/step, prefill {t['prefill_ms_avg']:.1f} ms over "
                  f"{t['prompt_tokens_avg']:.0f} tokens; answers {s['target_answer_tokens_mean']:.1f} tokens on "
                  f"average (max {s['target_answer_tokens_max']})."]
        if hf:
            lines += [f"HF generate (static cache): {1000 * hf['wall_time_avg']:.1f} ms per sample; our target "
                      f"alone is {hf['target_speedup_vs_hf']:.2f}x faster; HF tokens equal our engine's on "
                      f"{hf['tokens_equal_engine_rate']:.3f} of samples."]
        rows = [{"drafter": n, **{label: d.get(k) for k, label in TABLE}} for n, d in s["drafters"].items()]
        lines += ["", markdown_table(rows, ["drafter", *[label for _, label in TABLE]], floatfmt=".3f"), ""]
    curve = summary.get("curve") or []
    if curve:
        cols = ["set", "drafter", "c", "verify ratio", *[f"a={a}" for a in CURVE_ACCEPTANCE]]
        lines += ["## Leviathan's speedup at the measured costs (decode phase, verify cost included)", "",
                  "(1 - a^(g+1)) / ((1 - a)(g c + v)), v = the measured verify step / decode step.", "",
                  markdown_table(curve, cols, floatfmt=".2f"), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {STAGE}.twin_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["7b", "small"], default="7b", help="twin shape (default 7b)")
    p.add_argument("--twin_dir", default=None, help="twin folder (default data/twin_<shape>; reused when complete)")
    p.add_argument("--data_dir", default="data/twin_data", help="test data folder (default data/twin_data)")
    p.add_argument("--output_dir", default="results/twin", help="run folders and the summary (default results/twin)")
    p.add_argument("--num_short", type=int, default=50, help="short-question samples (default 50)")
    p.add_argument("--num_long", type=int, default=50, help="long-question samples (default 50)")
    p.add_argument("--num_free", type=int, default=10,
                   help="long samples for EventGPT free-tokens-only and its timeline (default 10; 0: skip)")
    p.add_argument("--max_new_tokens", type=int, default=128,
                   help="answer length limit (default 128: the long answers whole; the earlier runs used 50)")
    p.add_argument("--gamma", type=int, default=5, help="draft tokens per step (default 5)")
    p.add_argument("--device", default="auto", help="torch device (default auto)")
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1), help="data processes")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--no_hf", dest="hf", action="store_false", help="skip the HF generate baseline")
    g = p.add_argument_group("the small pair and its trained drafters (widened with it)")
    g.add_argument("--eventgpt_path", default=None, help="EventGPT checkpoint to widen (default: the shipped one)")
    g.add_argument("--videollava_path", default=None, help="Video-LLaVA checkpoint to widen (default: the shipped one)")
    g.add_argument("--token_adapter", default=None, help="TokenAdapter trained on that pair (checkpoint or run folder)")
    g.add_argument("--hidden_adapter", default=None, metavar="PATH[,PATH...]",
                   help="hidden adapters (L1-L5) trained on that pair, comma-separated")
    g.add_argument("--eagle_head", default=None, help="EAGLE head trained on that pair's Video-LLaVA")
    g.add_argument("--drafters", dest="only", default=None, metavar="LIST",
                   help="comma list of compare_drafters rows to run (default: every one; without trained drafters "
                        "eventgpt,pooled_x2), e.g. eventgpt,token_adapter,L1,L5,eagle,hybrid; with "
                        "--tree_topk/--tree_tokens the kept eagle and hybrid rows get their _tree copies")
    g.add_argument("--drafters_json", default=None,
                   help="drafters.json of scripts.train_drafters: its checkpoints (the flags above override)")
    add_tree_args(p)
    return p


def run(cfg: TwinConfig, command: str) -> dict[str, Any]:
    """All four steps; writes twin_results.json and TWIN_RESULTS.md under ``cfg.output_dir``."""
    from common.cli import resolve_device

    started = time.perf_counter()
    twin = ensure_twin(cfg.twin_dir, cfg.shape, cfg.eventgpt_path, cfg.videollava_path)
    log.info("twin ready (%s, %.0f s)", "reused" if twin["reused"] else "widened", twin["seconds"])
    widened = ensure_twin_drafters(cfg) if cfg.drafters else None
    data = make_twin_data(cfg.data_dir, cfg.num_short, cfg.num_long, cfg.num_workers)
    summary: dict[str, Any] = {"twin": twin, "device": str(resolve_device(cfg.device)), "gamma": cfg.gamma,
                               "max_new_tokens": cfg.max_new_tokens, "sets": {}, "run_dirs": {},
                               "widened_drafters": widened}
    if summary["device"].startswith("cuda"):
        import transformers

        summary.update(device_name=torch.cuda.get_device_name(), torch=torch.__version__,
                       transformers=transformers.__version__)
    hf_records: dict[str, list] = {}
    for name, folder in data.items():
        num = cfg.num_short if name == "short" else cfg.num_long
        compare = run_compare(name, folder, num, cfg, widened)
        summary["run_dirs"][name] = compare["run_dir"]
        _release()
        hf_records[name] = (_guarded(summary, f"hf_{name}", hf_generate_pass, folder, num, cfg) or []) if cfg.hf else []
        summary["sets"][name] = summarize_set(compare, hf_records[name])
        summary["sets"][name]["hf_records"] = hf_records[name]
        _release()
        if name == "long" and cfg.num_free:
            free = _guarded(summary, "free_only", run_free_only, folder, min(cfg.num_free, num), cfg)
            if free:
                summary["run_dirs"]["free_only"] = free["run_dir"]
                _copy_timeline(Path(free["run_dir"]), cfg.output_dir)
                summary["sets"]["long"]["drafters"]["eventgpt_free_only"] = summarize_free_only(free,
                                                                                                hf_records[name])
            _release()
        summary["curve"] = leviathan_curve(summary["sets"], cfg.gamma)
        _write(cfg, summary, command, started)
    summary["curve"] = leviathan_curve(summary["sets"], cfg.gamma)
    _write(cfg, summary, command, started)
    return summary


def _copy_timeline(run_dir: Path, output_dir: Path) -> None:
    """The free-tokens-only run's timeline.png beside TWIN_RESULTS.md."""
    if (run_dir / "timeline.png").is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "timeline.png", output_dir / "timeline.png")


def _guarded(summary: dict[str, Any], step: str, fn: Any, *args: Any) -> Any:
    """Run an optional step; a failure is logged and noted in the summary, the rest still runs."""
    try:
        return fn(*args)
    except Exception as exc:  # a baseline that breaks must not lose the drafters' measurement
        log.exception("%s failed", step)
        summary.setdefault("failures", {})[step] = f"{type(exc).__name__}: {exc}"[:500]
        return None


def _release() -> None:
    """Free the finished step's models before the next one loads its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write(cfg: TwinConfig, summary: dict[str, Any], command: str, started: float) -> None:
    from common.results import atomic_write_json, atomic_write_text

    summary["seconds"] = time.perf_counter() - started
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.output_dir / "twin_results.json", summary)
    atomic_write_text(cfg.output_dir / "TWIN_RESULTS.md", render_markdown(summary, command))


def _read_drafters_json(path: str) -> dict[str, Any]:
    """The checkpoint paths in a drafters.json of ``scripts.train_drafters``."""
    from common.errors import DataError

    try:
        return dict(json.loads(Path(path).read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a drafters.json of scripts.train_drafters ({type(exc).__name__}: {exc}); "
                        "pass the file it wrote, or the --token_adapter/--hidden_adapter/--eagle_head flags") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from common.drafters.widen import DrafterSources

    trained = _read_drafters_json(args.drafters_json) if args.drafters_json else {}
    hidden = args.hidden_adapter.split(",") if args.hidden_adapter else trained.get("hidden_adapter", [])
    sources = DrafterSources(eagle_head=args.eagle_head or trained.get("eagle_head"),
                             hidden_adapters=tuple(x.strip() for x in hidden if x.strip()),
                             token_adapter=args.token_adapter or trained.get("token_adapter"))
    cfg = TwinConfig(shape=args.shape, twin_dir=Path(args.twin_dir or f"data/twin_{args.shape}"),
                     data_dir=Path(args.data_dir), output_dir=Path(args.output_dir), num_short=args.num_short,
                     num_long=args.num_long, num_free=args.num_free, max_new_tokens=args.max_new_tokens,
                     gamma=args.gamma, device=args.device, num_workers=args.num_workers, hf=args.hf,
                     warmup_steps=args.warmup_steps, eventgpt_path=args.eventgpt_path,
                     videollava_path=args.videollava_path, drafters=sources if sources else None,
                     tree_topk=args.tree_topk, tree_tokens=args.tree_tokens,
                     tree_depth=args.tree_depth, only=args.only)
    return run(cfg, f"python -m {STAGE}.twin_benchmark {' '.join(argv)}")


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
