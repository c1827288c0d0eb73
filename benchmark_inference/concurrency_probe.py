"""Two models on one GPU: which way of running the draft beside the target's prefill works (issue 15, item 5).

    python -m benchmark_inference.concurrency_probe --json $OUT/concurrency.json [--models_dir /tmp/rs]

At real 7B shapes (random weights, ``write_real_shape_pair``), the target (Video-LLaVA: vision
encode + 2069-token prefill) prefills while the draft (EventGPT: vision + ~618-token prefill, then
one-token steps) runs beside it. Per variant: the target's prefill alone and concurrent (median
ms), the slowdown, when the draft's prefill ended and how many draft tokens were done by the
target's prefill end (both from the target's start). Variants:

- ``a0_threads``: two threads, two streams (the default ``common.parallel`` run);
- ``a_threads_priority``: the same, the draft's stream at high priority;
- ``b_draft_graphs``: + the draft's LLM prefill as one CUDA graph (its steps already are), so its
  launches need no interpreter-lock time; ``b_draft_graphs_switch``: + a 0.5 ms thread switch interval;
- ``c_processes`` / ``c_processes_mps``: a process per model (own CUDA contexts), without and with MPS
  (started here if permitted; the JSON says whether it was); ``--mps_target_percent 85`` adds
  ``c_processes_mps_target_85pct`` (the target's process limited to 85% of the SMs);
- ``d_green_<n>``: the draft in a green context of n SMs (where torch has them); ``d_green_target_<n>``:
  the target in one of n SMs, so the card's other SMs stay free for the draft;
- ``e_head_start_<ms>``: the draft starts that long before the target (b's settings).

The best variant (slowdown within the goal first, then free tokens, then slowdown) is named in
``best``. ``--device cpu`` runs every variant's logic on tiny checkpoints (``--models_dir``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

SLOWDOWN_GOAL = 1.15
FREE_TOKENS_GOAL = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_inference.concurrency_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="where to write the results (JSON)")
    p.add_argument("--models_dir", default="/tmp/real_shape_models",
                   help="checkpoints eventgpt/ and videollava/ (written at 7B shapes on CUDA when missing)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny checkpoints: a logic check)")
    p.add_argument("--quant", default="bf16", help="precision the checkpoints load in (default bf16)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median; default 5)")
    p.add_argument("--max_free", type=int, default=64, help="cap on draft tokens per round (default 64)")
    p.add_argument("--variants", default="all", help="comma list of variant names or prefixes (a0,a,b,c,d,e); "
                                                     "default all")
    p.add_argument("--green_sms", default="16,32",
                   help="SM counts of the green-context variants (multiples of 8 on Hopper)")
    p.add_argument("--process_timeout", type=float, default=120.0,
                   help="seconds the per-process variants may wait for a child (loading included; default 120)")
    p.add_argument("--target_sms", default="112,96",
                   help="SM counts of the target's green context in the d_green_target variants (H200: 132 SMs)")
    p.add_argument("--mps_target_percent", default="",
                   help="with MPS: extra c variants whose target process may use only this %% of the SMs "
                        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), e.g. 85,70; default none")
    p.add_argument("--head_start_ms", default="10,20,30", help="head starts of the e variants, ms")
    return p


def in_process_variants(green_sms: list[int], head_starts_ms: list[float], target_sms: list[int] = ()
                        ) -> dict[str, Any]:
    """Name -> ``ConcurrencyOptions`` of every in-process variant (``d_green_<n>``: the draft on n SMs;
    ``d_green_target_<n>``: the target on n SMs, the rest kept for the draft)."""
    from common.concurrency import ConcurrencyOptions

    graphs = dict(draft_priority=-1, graph_draft_prefill=True)
    out = {"a0_threads": ConcurrencyOptions(), "a_threads_priority": ConcurrencyOptions(draft_priority=-1),
           "b_draft_graphs": ConcurrencyOptions(**graphs),
           "b_draft_graphs_switch": ConcurrencyOptions(**graphs, switch_interval_s=0.0005)}
    out.update({f"e_head_start_{ms:g}": ConcurrencyOptions(**graphs, head_start_s=ms / 1000) for ms in head_starts_ms})
    # last: a green context that fails could leave the CUDA context unusable for what follows
    out.update({f"d_green_{n}": ConcurrencyOptions(graph_draft_prefill=True, draft_sms=n) for n in green_sms})
    out.update({f"d_green_target_{n}": ConcurrencyOptions(**graphs, target_sms=n) for n in target_sms})
    return out


def wanted(name: str, selection: str) -> bool:
    """Whether ``--variants`` selects ``name`` (by full name or by its letter prefix, e.g. 'b', 'a0')."""
    if selection in ("", "all"):
        return True
    keys = [k.strip() for k in selection.split(",") if k.strip()]
    return any(name == k or name.split("_")[0] == k for k in keys)


def best_variant(results: dict[str, dict[str, Any]]) -> str | None:
    """The variant within the slowdown goal with the most free tokens (then the least slowdown); None if none ran."""
    ok = {k: r for k, r in results.items() if "concurrent_prefill_slowdown" in r}
    if not ok:
        return None

    def rank(name: str) -> tuple:
        r = ok[name]
        return (r["concurrent_prefill_slowdown"] <= SLOWDOWN_GOAL, r["free_draft_tokens"], -r["concurrent_prefill_slowdown"])

    return max(ok, key=rank)


def _draft_worker(draft, pixels, options, ready: threading.Event, go: threading.Event, done: threading.Event,
                  box: dict[str, Any], max_free: int) -> None:
    """The draft's lane of one round: prefill, then one-token steps until ``done``; stamps in ``box``."""
    import torch

    from benchmark_inference.real_shape_timing import QUESTION
    from common.concurrency import draft_lane

    try:
        with torch.no_grad(), draft_lane(draft.device, options):
            ready.set()
            go.wait()
            box["start"] = time.perf_counter()
            state = draft.prefill(draft.encode_pixels(pixels), QUESTION)
            box["launched"] = time.perf_counter()
            token = int(state.logits.argmax())  # a host read on the draft's stream: its prefill is done
            box["prefill_end"], ends = time.perf_counter(), []
            while not done.is_set() and len(ends) < max_free:
                token = int(draft.forward(state, [token])[-1].argmax())
                ends.append(time.perf_counter())
            box["token_ends"] = ends
    except BaseException as exc:  # noqa: BLE001  (re-raised by the caller)
        box["error"] = exc
    finally:
        ready.set()


def concurrent_round(draft, target, t_pix, d_pix, options, max_free: int) -> dict[str, float]:
    """One in-process round: target prefill on the main thread, the draft's lane beside it (ms from the target's start)."""
    import torch

    from benchmark_inference.real_shape_timing import QUESTION
    from common.concurrency import switch_interval, target_lane
    from common.timing import sync

    ready, go, done, box = threading.Event(), threading.Event(), threading.Event(), {}
    sync(target.device)
    thread = threading.Thread(target=_draft_worker, args=(draft, d_pix, options, ready, go, done, box, max_free),
                              name="draft")
    thread.start()
    ready.wait()
    with switch_interval(options.switch_interval_s), torch.no_grad():
        go.set()
        if options.head_start_s > 0:
            time.sleep(options.head_start_s)
        with target_lane(target.device, options) as t_stream:
            t0 = time.perf_counter()
            target.prefill(target.encode_pixels(t_pix), QUESTION)
            launched = time.perf_counter()  # the host has queued the target's prefill
            if t_stream is not None:
                t_stream.synchronize()
            t1 = time.perf_counter()
        done.set()
        thread.join()
    from benchmark_inference.concurrency_processes import draft_figures

    if "error" in box:
        raise box["error"]
    return {"target_prefill_ms": 1000 * (t1 - t0), "target_launched_ms": 1000 * (launched - t0),
            **draft_figures(t0, t1, box["start"], box["launched"], box["prefill_end"], box["token_ends"])}


def _median(values) -> float:
    """Median of the values that are numbers (NaN marks 'none in this round'); NaN when none are."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def alone_ms(vlm, pixels, repeats: int, stream=None) -> float:
    """Median ms of vision encode + LLM prefill by itself (after one warm-up)."""
    import torch

    from benchmark_inference.real_shape_timing import QUESTION
    from common.timing import sync

    times = []
    for _ in range(repeats + 1):
        sync(vlm.device)
        with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else _Null():
            t0 = time.perf_counter()
            int(vlm.prefill(vlm.encode_pixels(pixels), QUESTION).logits.argmax())
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def run_variant(draft, target, t_pix, d_pix, options, repeats: int, max_free: int, target_alone: float
                ) -> dict[str, Any]:
    """Medians over ``repeats`` concurrent rounds (after one warm-up round) of one in-process variant."""
    from common.concurrency import prepare_draft

    if options.graph_draft_prefill:
        prepare_draft(draft, options)
    else:
        draft.disable_prefill_graphs()
    rounds = [concurrent_round(draft, target, t_pix, d_pix, options, max_free) for _ in range(repeats + 1)][1:]
    out: dict[str, Any] = {key: _median(r[key] for r in rounds) for key in rounds[0]}
    out["target_prefill_concurrent_ms"] = out.pop("target_prefill_ms")
    out.update(target_prefill_alone_ms=target_alone,
               concurrent_prefill_slowdown=out["target_prefill_concurrent_ms"] / target_alone,
               draft_prefill_graphed=draft.prefill_graphs is not None, options=options.describe(), rounds=rounds)
    return out


def probe_in_process(draft, target, variants: dict[str, Any], repeats: int, max_free: int,
                     write=None) -> dict[str, Any]:
    """Every in-process variant on loaded models (graphs on where CUDA); a variant that fails is reported, not fatal."""
    import torch

    from benchmark_inference.real_shape_timing import decode_ms_per_token, raw_inputs
    from common.concurrency import lane_stream

    write = write or (lambda part: None)
    t_pix, d_pix = target.preprocess(raw_inputs("videollava")), draft.preprocess(raw_inputs("eventgpt"))
    report: dict[str, Any] = {"target_prefill_alone_ms": alone_ms(target, t_pix, repeats,
                                                                  lane_stream(target.device, "target"))}
    draft.disable_prefill_graphs()
    report["draft_prefill_alone_ms"] = alone_ms(draft, d_pix, repeats)
    with torch.no_grad():
        report["draft_step_alone_ms"] = decode_ms_per_token(draft, draft.encode_pixels(d_pix), 10)
    if draft.device.type == "cuda" and draft.graphs is not None:
        draft.enable_prefill_graphs()
        report["draft_prefill_graphed_alone_ms"] = alone_ms(draft, d_pix, repeats)
    results: dict[str, Any] = {}
    for name, options in variants.items():
        try:
            results[name] = run_variant(draft, target, t_pix, d_pix, options, repeats, max_free,
                                        report["target_prefill_alone_ms"])
        except Exception as exc:  # report, keep measuring the rest
            results[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}", "options": options.describe()}
        write({**report, "variants": results})
    draft.disable_prefill_graphs()
    return {**report, "variants": results}


def _write_pair(models_dir: str) -> None:
    from common.models.real_shape import write_real_shape_pair

    write_real_shape_pair(models_dir)


def ensure_checkpoints(models_dir: Path, device: str) -> None:
    """7B-shape checkpoints in ``models_dir``, written by a child process (this one keeps no CUDA context)."""
    if all((models_dir / kind / "config.json").is_file() for kind in ("eventgpt", "videollava")):
        return
    if not device.startswith("cuda"):
        from common.errors import DataError

        raise DataError(f"--models_dir {models_dir} lacks eventgpt/ and videollava/ checkpoints; pass a folder "
                        "that has them (e.g. scripts.make_tiny_models' output) or run on CUDA to write them")
    import torch.multiprocessing as mp

    child = mp.get_context("spawn").Process(target=_write_pair, args=(str(models_dir),))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"writing the 7B-shape checkpoints into {models_dir} failed (exit {child.exitcode})")


def probe_processes(args, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Variant c without and (if it starts) with MPS; returns (results, MPS info)."""
    from benchmark_inference.concurrency_processes import (
        ProcessLaneConfig,
        mps_servers,
        run_process_variant,
        start_mps,
        stop_mps,
    )

    cfg = ProcessLaneConfig(models_dir=str(args.models_dir), device=args.device, quant=args.quant,
                            max_free=args.max_free)
    results: dict[str, Any] = {}
    if "c_processes" in names:
        results["c_processes"] = run_process_variant(cfg, args.repeats, timeout_s=args.process_timeout)
    mps: dict[str, Any] = {"tried": False}
    if "c_processes_mps" in names and args.device.startswith("cuda"):
        mps = {"tried": True, **start_mps(Path(tempfile.mkdtemp(prefix="mps_", dir="/tmp")))}
        try:
            if mps["started"]:
                results["c_processes_mps"] = run_process_variant(
                    cfg, args.repeats, timeout_s=args.process_timeout, on_ready=lambda: {"mps_server_list": mps_servers(mps)})
                for pct in [int(p) for p in args.mps_target_percent.split(",") if p]:
                    limited = replace(cfg, target_env=(("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", str(pct)),))
                    results[f"c_processes_mps_target_{pct}pct"] = run_process_variant(
                        limited, args.repeats, timeout_s=args.process_timeout)
            else:
                results["c_processes_mps"] = {"failed": f"MPS did not start: {mps.get('error')}"}
        finally:
            mps = stop_mps(mps)
    return results, mps


def _header(device: str) -> dict[str, Any]:
    import torch
    import transformers

    card = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "command": "python -m benchmark_inference.concurrency_probe "
            + " ".join(sys.argv[1:]), "slowdown_goal": SLOWDOWN_GOAL, "free_tokens_goal": FREE_TOKENS_GOAL}


def _load_pair(args):
    from common.models.loader import load_vlm

    draft = load_vlm("eventgpt", args.models_dir / "eventgpt", quant=args.quant, device=args.device)
    target = load_vlm("videollava", args.models_dir / "videollava", quant=args.quant, device=args.device)
    for m in (draft, target):
        if m.device.type == "cuda":
            m.enable_cuda_graphs(4096, step_sizes=(1,))
            m.enable_vision_graphs()
    return draft, target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from common.concurrency import green_contexts_supported
    from common.results import atomic_write_json

    args = build_parser().parse_args(argv)
    args.models_dir = Path(args.models_dir)
    started = time.perf_counter()
    variants = in_process_variants([int(n) for n in args.green_sms.split(",") if n],
                                   [float(ms) for ms in args.head_start_ms.split(",") if ms],
                                   [int(n) for n in args.target_sms.split(",") if n])
    names = [n for n in [*variants, "c_processes", "c_processes_mps"] if wanted(n, args.variants)]
    report: dict[str, Any] = {}

    def write(part: dict[str, Any]) -> None:
        atomic_write_json(Path(args.json), {**report, **part, "seconds": time.perf_counter() - started})

    ensure_checkpoints(args.models_dir, args.device)
    process_results, report["mps"] = probe_processes(args, names)
    report["variants"] = process_results
    write({})
    report.update(_header(args.device), green_contexts_supported=green_contexts_supported())  # CUDA from here on
    draft, target = _load_pair(args)
    chosen = {n: o for n, o in variants.items() if n in names}
    inner = probe_in_process(draft, target, chosen, args.repeats, args.max_free,
                             write=lambda part: write({**part, "variants": {**process_results, **part["variants"]}}))
    report.update({k: v for k, v in inner.items() if k != "variants"})
    report["variants"] = {**process_results, **inner["variants"]}
    report["best"] = best_variant(report["variants"])
    write({})
    print({n: {k: r.get(k) for k in ("concurrent_prefill_slowdown", "free_draft_tokens", "draft_prefill_end_ms",
                                     "failed") if k in r} for n, r in report["variants"].items()}, flush=True)
    print("best:", report["best"], flush=True)
    return report


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
