"""Variant (c) of the concurrency probe: one process per model, each with its own CUDA context.

Both models run in spawned processes (``torch.multiprocessing``); the parent only orchestrates, so
MPS, when it can be started, serves both. Rounds are driven through a barrier; each child writes
its ``time.perf_counter()`` stamps (one clock for every process on Linux) into a shared CPU tensor:

- target: [start, end] of vision encode + LLM prefill;
- draft: [start, prefill end, n, token 1 end, ..., token n end], stopping when the target's
  ``done`` event is set (or at ``max_free`` tokens; at ``alone_tokens`` when it runs alone).

Without MPS two contexts time-slice the GPU rather than share its SMs; ``start_mps`` tries
``nvidia-cuda-mps-control -d`` with its pipe and log folders under a temporary folder and says
whether it worked.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUND_MODES = {"both": 0, "target": 1, "draft": 2, "quit": 3}
HEADER = 3  # draft stamps: start, prefill end, token count


@dataclass(frozen=True)
class ProcessLaneConfig:
    """What each child loads and how it runs."""

    models_dir: str
    device: str = "cuda"
    quant: str = "bf16"
    max_free: int = 64
    alone_tokens: int = 8
    head_start_s: float = 0.0
    draft_priority: int = -1
    target_env: tuple[tuple[str, str], ...] = ()  # set in the target's process before CUDA starts


def _load(kind: str, cfg: ProcessLaneConfig):
    """The model of ``kind`` on the device, graphs on where CUDA (decode, vision; the draft's prefill too)."""
    from benchmark_inference.real_shape_timing import raw_inputs
    from common.models.loader import load_vlm

    vlm = load_vlm(kind, Path(cfg.models_dir) / kind, quant=cfg.quant, device=cfg.device)
    if vlm.device.type == "cuda":
        vlm.enable_cuda_graphs(4096, step_sizes=(1,))
        vlm.enable_vision_graphs()
        if kind == "eventgpt":
            vlm.enable_prefill_graphs()
    return vlm, vlm.preprocess(raw_inputs(kind))


def _run_target(vlm, pixels, stamps, stream) -> None:
    import torch

    from benchmark_inference.real_shape_timing import QUESTION

    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else _null()):
        stamps[0] = time.perf_counter()
        vlm.prefill(vlm.encode_pixels(pixels), QUESTION)
        if stream is not None:
            stream.synchronize()
        stamps[1] = time.perf_counter()


def _run_draft(vlm, pixels, stamps, stream, done, limit: int) -> None:
    import torch

    from benchmark_inference.real_shape_timing import QUESTION

    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else _null()):
        stamps[0] = time.perf_counter()
        state = vlm.prefill(vlm.encode_pixels(pixels), QUESTION)
        token = int(state.logits.argmax())  # a host read: the prefill has finished
        stamps[1] = time.perf_counter()
        n = 0
        while (done is None or not done.is_set()) and n < limit:
            token = int(vlm.forward(state, [token])[-1].argmax())
            stamps[HEADER + n] = time.perf_counter()
            n += 1
        stamps[2] = n


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def lane_main(role: str, cfg: ProcessLaneConfig, ctrl, stamps, barrier, done, errors) -> None:
    """A child: load its model, warm up, then run the rounds the parent starts until told to quit."""
    try:
        from common.concurrency import lane_stream

        if role == "target":  # e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE: read when the CUDA context is made
            os.environ.update(dict(cfg.target_env))
        vlm, pixels = _load("videollava" if role == "target" else "eventgpt", cfg)
        stream = lane_stream(vlm.device, role, cfg.draft_priority if role == "draft" else 0)
        for _ in range(2):  # warm-up (and captures)
            if role == "target":
                _run_target(vlm, pixels, stamps, stream)
            else:
                _run_draft(vlm, pixels, stamps, stream, None, 2)
        barrier.wait()  # ready
        while True:
            barrier.wait()  # round start
            mode = int(ctrl[0])
            if mode == ROUND_MODES["quit"]:
                return
            if role == "target" and mode in (0, 1):
                if mode == 0 and cfg.head_start_s > 0:  # the draft's head start: the target waits
                    time.sleep(cfg.head_start_s)
                _run_target(vlm, pixels, stamps, stream)
                done.set()
            elif role == "draft" and mode in (0, 2):
                _run_draft(vlm, pixels, stamps, stream, done if mode == 0 else None,
                           cfg.max_free if mode == 0 else cfg.alone_tokens)
            barrier.wait()  # round end
    except BaseException as exc:  # noqa: BLE001  (reported to the parent)
        errors.put(f"{role}: {type(exc).__name__}: {str(exc)[:300]}")
        barrier.abort()


def draft_figures(t0: float, t1: float, start: float, launched: float, prefill_end: float, ends: list[float]
                  ) -> dict[str, float]:
    """The draft's side of a round, ms from the target's start ``t0`` (the target's prefill ended at ``t1``).

    ``launched``: when the host had queued the draft's prefill; step times are the gaps between token ends
    inside the target's window (``draft_step_ms_in_window``) and after it (``draft_step_ms_after``).
    """
    marks = [prefill_end, *ends]
    inside = [b - a for a, b in zip(marks, marks[1:]) if b <= t1]
    after = [b - a for a, b in zip(marks, marks[1:]) if a >= t1]
    return {"draft_start_ms": 1000 * (start - t0), "draft_prefill_launched_ms": 1000 * (launched - t0),
            "draft_prefill_end_ms": 1000 * (prefill_end - t0), "free_draft_tokens": float(sum(e <= t1 for e in ends)),
            "draft_tokens": float(len(ends)),
            "draft_step_ms_in_window": 1000 * statistics.median(inside) if inside else float("nan"),
            "draft_step_ms_after": 1000 * statistics.median(after) if after else float("nan")}


def round_result(t_stamps, d_stamps) -> dict[str, float]:
    """One concurrent round's figures from the two stamp tensors (ms from the target's start)."""
    t0, t1 = float(t_stamps[0]), float(t_stamps[1])
    ends = [float(d_stamps[HEADER + i]) for i in range(int(d_stamps[2]))]
    return {"target_prefill_ms": 1000 * (t1 - t0),
            **draft_figures(t0, t1, float(d_stamps[0]), float(d_stamps[1]), float(d_stamps[1]), ends)}


def run_process_variant(cfg: ProcessLaneConfig, repeats: int, timeout_s: float = 300.0,
                        on_ready: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Spawn both children, time target alone, draft alone and both together (medians); never raises.

    ``on_ready()`` runs once both children are loaded (e.g. to ask MPS for its servers); its dict joins the result.
    """
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    ctrl = torch.zeros(1, dtype=torch.int64).share_memory_()
    t_stamps = torch.zeros(2, dtype=torch.float64).share_memory_()
    d_stamps = torch.zeros(HEADER + max(cfg.max_free, cfg.alone_tokens), dtype=torch.float64).share_memory_()
    barrier, done, errors = ctx.Barrier(3, timeout=timeout_s), ctx.Event(), ctx.SimpleQueue()
    kids = [ctx.Process(target=lane_main, args=(role, cfg, ctrl, stamps, barrier, done, errors), daemon=True)
            for role, stamps in (("target", t_stamps), ("draft", d_stamps))]
    rows: dict[str, list] = {"target": [], "draft": [], "both": []}
    try:
        for kid in kids:
            kid.start()
        barrier.wait()  # both loaded and warm
        extra = on_ready() if on_ready else {}
        plan = ["target"] * repeats + ["draft"] * repeats + ["both"] * (repeats + 1)
        for mode in plan:
            ctrl[0] = ROUND_MODES[mode]
            done.clear()
            barrier.wait()
            barrier.wait()
            if mode == "target":
                rows[mode].append(1000 * float(t_stamps[1] - t_stamps[0]))
            elif mode == "draft":
                n = int(d_stamps[2])
                steps = [float(d_stamps[HEADER + i] - d_stamps[HEADER + i - 1]) for i in range(1, n)]
                rows[mode].append((1000 * float(d_stamps[1] - d_stamps[0]), 1000 * statistics.median(steps or [0.0])))
            else:
                rows[mode].append(round_result(t_stamps, d_stamps))
        ctrl[0] = ROUND_MODES["quit"]
        barrier.wait()
    except Exception as exc:  # a child failed or hung: report it, keep the probe going
        barrier.abort()
        time.sleep(0.5)
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        return {"failed": "; ".join(messages) or f"{type(exc).__name__}: {exc}"}
    finally:
        for kid in kids:
            kid.join(timeout=30)
            if kid.is_alive():
                kid.terminate()
    return {**summarize(rows), **extra}


def summarize(rows: dict[str, list]) -> dict[str, Any]:
    """Medians of the rounds (the first concurrent round is a warm-up)."""
    both = rows["both"][1:] or rows["both"]
    alone = statistics.median(rows["target"])
    out = {key: statistics.median([v for v in (r[key] for r in both) if v == v] or [float("nan")])
           for key in both[0]}
    out.update(target_prefill_alone_ms=alone, target_prefill_concurrent_ms=out.pop("target_prefill_ms"),
               draft_prefill_alone_ms=statistics.median(r[0] for r in rows["draft"]),
               draft_step_alone_ms=statistics.median(r[1] for r in rows["draft"]), rounds=both)
    out["concurrent_prefill_slowdown"] = out["target_prefill_concurrent_ms"] / alone
    return out


def _mps_control(env: dict[str, str], command: str | None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise FileNotFoundError("nvidia-cuda-mps-control not found on PATH")
    args = [exe] if command is not None else [exe, "-d"]
    return subprocess.run(args, input=command, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def start_mps(root: Path) -> dict[str, Any]:
    """Start the MPS control daemon with its folders under ``root``; on success its env is in ``os.environ``."""
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for folder in env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        done = _mps_control(env, None)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"started": False, "error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        return {"started": False, "error": (done.stderr or done.stdout).strip()[:300] or f"exit {done.returncode}"}
    os.environ.update(env)  # the spawned children connect through it
    return {"started": True, "env": env}


def mps_servers(info: dict[str, Any]) -> str:
    """The daemon's answer to ``get_server_list`` (a server's pid while clients are connected), or the error."""
    try:
        return _mps_control(info["env"], "get_server_list\n").stdout.strip()
    except (KeyError, OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"


def stop_mps(info: dict[str, Any]) -> dict[str, Any]:
    """Quit the daemon and drop its env; returns ``info`` with what it said (and its logs' tails)."""
    env = info.get("env")
    if not env:
        return info
    out = dict(info)
    try:
        out["quit"] = _mps_control(env, "quit\n").returncode
    except (OSError, subprocess.SubprocessError) as exc:
        out["stop_error"] = f"{type(exc).__name__}: {exc}"
    for name in ("control.log", "server.log"):
        log = Path(env["CUDA_MPS_LOG_DIRECTORY"]) / name
        if log.is_file():
            out[name] = log.read_text(errors="replace")[-600:]
    for key in env:
        os.environ.pop(key, None)
    time.sleep(1.0)  # let the server exit before this process makes its own context
    return out
