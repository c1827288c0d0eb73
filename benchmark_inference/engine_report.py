"""The engine report of issue 15, called by ``real_shape_benchmark --engine``: one run, one GPU.

At Video-LLaVA-7B shapes (random weights through the real loaders) it measures our decode step in
each ``--engine_modes`` mode, transformers ``generate`` with a static cache, a ~30-line
``torch.compile`` loop over HF's ``StaticCache`` on the same weights, verify(gamma+1)/decode(1), a 16-row
draft tree's verify/decode(1) (``tree_verify_over_decode``),
the EAGLE drafter's cost c per drafted token (its commit and gamma-token chain replayed as CUDA graphs;
the eager head's c beside it as ``eagle_c_eager``; the L5 drafter's feature-space chain as ``l5_chain_c``;
one topk-4, 16-row EAGLE draft tree as ``eagle_tree_c``, its eager reference as ``eagle_tree_c_eager``, both
per tree), the LLM prefill of the 2069-token prompt, and the target's prefill (vision + LLM) alone vs
with EventGPT prefilling and drafting beside it on its own stream, with the free draft tokens finished
inside that window. ``engine_report`` takes
loaded models, so the CPU path is tested at tiny shapes.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import inspect
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark_inference.concurrency_probe import best_variant, in_process_variants, probe_in_process
from benchmark_inference.real_shape_timing import (
    QUESTION,
    TREE_PARENTS,
    decode_ms_per_token,
    eagle_tree_verify_ratio,
    hf_generate,
    raw_inputs,
    tree_verify_ratio,
    verify_ratio,
)
from benchmark_parallel_prefill.drafter_costs import (
    eagle_chain_costs,
    eagle_costs,
    eagle_tree_costs,
    l5_chain_costs,
)
from common.models.decoder import capture_graph, graph_replay_ms
from common.results import atomic_write_json
from common.timing import sync
from common.tree import TreeConfig


@dataclass
class EngineOptions:
    """What ``engine_report`` measures and how often."""

    modes: list[str] = field(default_factory=lambda: ["cuda_graph", "fused_graph"])
    new_tokens: int = 50
    gamma: int = 5
    steps: int = 30
    context: int = 50
    concurrent_repeats: int = 3
    baselines: bool = True
    tree_topk: int = 4  # the EAGLE draft tree priced as eagle_tree_c (--tree_topk/--tree_tokens)
    tree_tokens: int = 16


# the in-process ways engine_report tries (concurrency_probe also tries green contexts, a head start and a
# process per model; a green context that fails may leave the CUDA context unusable, so not here)
ENGINE_VARIANTS = ("a0_threads", "a_threads_priority", "b_draft_graphs", "b_draft_graphs_switch")


def _keys(probe: dict[str, Any], name: str) -> dict[str, float]:
    row = probe["variants"][name]
    return {"target_prefill_alone_ms": row["target_prefill_alone_ms"],
            "target_prefill_concurrent_ms": row["target_prefill_concurrent_ms"],
            "draft_prefill_alone_ms": probe["draft_prefill_alone_ms"],
            "draft_prefill_end_concurrent_ms": row["draft_prefill_end_ms"],
            "concurrent_prefill_slowdown": row["concurrent_prefill_slowdown"],
            "free_draft_tokens": row["free_draft_tokens"]}


def concurrent_prefill(draft, target, repeats: int, max_free: int = 256, draft_priority: int = 0) -> dict[str, float]:
    """Target prefill alone vs with the draft prefilling then decoding beside it (two threads, two streams); medians.

    ``draft_priority`` < 0 puts the draft's stream above the target's (CUDA stream priority).
    """
    from common.concurrency import ConcurrencyOptions

    probe = probe_in_process(draft, target, {"run": ConcurrencyOptions(draft_priority=draft_priority)}, repeats, max_free)
    if "failed" in probe["variants"]["run"]:
        raise RuntimeError(probe["variants"]["run"]["failed"])
    return _keys(probe, "run")


def best_concurrent_prefill(draft, target, repeats: int, max_free: int = 256) -> dict[str, Any]:
    """The in-process ways of running the draft beside the target (``concurrency_probe``), the best one's figures.

    Returns the ``_keys`` figures of the best variant (``best_variant``: slowdown within 1.15 first, then free
    tokens), its name as ``concurrency_variant``, and every variant's medians under ``concurrency_variants``.
    """
    every = in_process_variants([], [])
    probe = probe_in_process(draft, target, {n: every[n] for n in ENGINE_VARIANTS}, repeats, max_free)
    best = best_variant(probe["variants"])
    if best is None:
        raise RuntimeError(f"no concurrency variant ran: {probe['variants']}")
    summary = {n: {k: v for k, v in r.items() if k != "rounds"} for n, r in probe["variants"].items()}
    return {**_keys(probe, best), "concurrency_variant": best, "concurrency_variants": summary,
            "draft_prefill_graphed_alone_ms": probe.get("draft_prefill_graphed_alone_ms")}


def compiled_loop_ms(vlm, visual, new_tokens: int) -> float:
    """gpt-fast style baseline: HF's LlamaModel + StaticCache, decode step via torch.compile; ms/token."""
    from transformers import StaticCache

    lm, head = vlm.runner.language_model, vlm.runner.lm_head
    embeds = vlm.prompt_embeds(visual, QUESTION)[None]
    length = embeds.shape[1]
    cache = StaticCache(config=lm.config, max_cache_len=length + new_tokens + 16)
    params = inspect.signature(lm.forward).parameters  # transformers renamed past_key_values -> cache
    cache_key = "past_key_values" if "past_key_values" in params else "cache"

    def forward(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kwargs = {cache_key: cache, "inputs_embeds": x, "position_ids": pos[None], "use_cache": True}
        if "cache_position" in params:
            kwargs["cache_position"] = pos
        return head(lm(**kwargs).last_hidden_state[:, -1]).argmax(-1)

    def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return forward(lm.embed_tokens(ids), pos)

    compiled = torch.compile(step, mode="reduce-overhead")
    token = forward(embeds, torch.arange(length, device=vlm.device))
    times = []
    for i in range(new_tokens + 3):
        pos = torch.tensor([length + i], device=vlm.device)
        sync(vlm.device)
        t0 = time.perf_counter()
        token = compiled(token[None].reshape(1, 1), pos).clone()
        int(token)  # the host needs the token, as in real decoding
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[3:])


def gemv_floor_ms(vlm, rows: int = 1, repeats: int = 20) -> float:
    """GPU ms of every weight matrix of the decoder + LM head as one-row ``F.linear`` calls in one CUDA graph.

    The stock-kernel (cuBLAS) floor of a decode step: the same bytes as a step, no attention or
    element-wise work. CUDA only.
    """
    from torch.nn import functional as F

    weights = [m.weight for layer in vlm.runner.layers
               for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                         layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)] + [vlm.lm_head.weight]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=vlm.device, dtype=vlm.dtype) for w in weights}
    # one warm-up pass (cuBLAS handles and workspaces) outside the capture, as the decoder's graphs do
    graph, _ = capture_graph(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], vlm.device, warmup=1)
    return graph_replay_ms(graph, vlm.device, repeats)


def _ours(target, visual, opts: EngineOptions, length: int) -> dict[str, dict[str, Any]]:
    """Per mode: decode ms/token and verify(gamma+1)/decode(1) of our engine."""
    out: dict[str, dict[str, Any]] = {}
    for mode in opts.modes:
        try:
            tree = len(TREE_PARENTS) + 1
            if mode != "eager":
                target.enable_cuda_graphs(length + opts.new_tokens + 8 * (opts.gamma + 1) + tree,
                                          step_sizes=(1, opts.gamma + 1, tree), kernels=mode == "fused_graph",
                                          tree_step=tree)
            row = {"kernels": target.runner.kernels_on,
                   "decode_ms_per_token": decode_ms_per_token(target, visual, opts.new_tokens),
                   "verify_over_decode": verify_ratio(target, visual, opts.gamma + 1, opts.steps),
                   # graphed on the Triton kernels (fused_graph), eager otherwise
                   "tree_verify_over_decode": tree_verify_ratio(target, visual, repeats=opts.steps),
                   # the same tree as the EAGLE drafter's whole verify step (mask, forward, accept, compact)
                   **eagle_tree_verify_ratio(target, visual, repeats=opts.steps)}
            if target.graphs is not None:  # GPU time of the step alone, the prompt's length of context live
                target.prefill(visual, QUESTION)
                row.update({f"graph_replay_ms_{k}": target.graphs.replay_ms(k) for k in (1, opts.gamma + 1)})
        except Exception as exc:  # report, keep measuring the rest
            row = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            target.disable_cuda_graphs()
        out[mode] = row
    return out


def _eagle(target, opts: EngineOptions) -> dict[str, Any]:
    """The EAGLE drafter's cost (random head at the target's shape): its chain as CUDA graphs on CUDA (the
    fixed-shape chain run eagerly on the CPU), and the eager head's step and commit beside it."""
    from feature_alignment.eagle_head import EagleHead, EagleHeadConfig

    head = EagleHead(EagleHeadConfig.for_target(target)).to(target.device, target.dtype).eval().bind(target)
    eager = eagle_costs(target, head, opts.context, opts.gamma, opts.steps)
    out: dict[str, Any] = {"eagle_eager_step_ms": eager["step_ms"], "eagle_eager_commit_ms": eager["commit_ms"]}
    graphs = target.device.type == "cuda"
    try:
        chain = eagle_chain_costs(target, head, opts.context, opts.gamma, opts.steps, graphs=graphs)
    except Exception as exc:  # report, keep the eager numbers as the cost
        out.update(eagle_chain_mode="eager", eagle_chain_failed=f"{type(exc).__name__}: {str(exc)[:200]}",
                   step_ms=eager["step_ms"], commit_ms=eager["commit_ms"])
        return out
    out.update({f"eagle_chain_{k}": v for k, v in chain.items()})
    out.update(eagle_chain_mode="graph" if graphs else "static", step_ms=chain["chain_ms"] / opts.gamma,
               commit_ms=chain["commit_ms"])
    try:  # a draft tree (--tree_topk/--tree_tokens) on the same chain: one graph replay per depth
        tree = eagle_tree_costs(head, opts.context, TreeConfig(topk=opts.tree_topk, tokens=opts.tree_tokens), opts.steps,
                                graphs=graphs)
        out.update({f"eagle_tree_{k}": v for k, v in tree.items()})
    except Exception as exc:  # report, keep the chain's numbers
        out["eagle_tree_failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def _l5(draft, target, opts: EngineOptions) -> dict[str, Any]:
    """The L5 drafter's feature-space chain per proposal (random adapter; CUDA graphs on CUDA)."""
    try:
        costs = l5_chain_costs(draft, target, opts.context, opts.gamma, opts.steps, graphs=target.device.type == "cuda")
    except Exception as exc:  # report, keep the rest
        return {"l5_chain_failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {f"l5_chain_{k}": v for k, v in costs.items()}


def _best(ours: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    ok = {m: r for m, r in ours.items() if "decode_ms_per_token" in r}
    if not ok:
        raise RuntimeError(f"no decode mode ran: {ours}")
    mode = min(ok, key=lambda m: ok[m]["decode_ms_per_token"])
    return mode, ok[mode]


def engine_report(draft, target, opts: EngineOptions, write=None) -> dict[str, Any]:
    """Measure everything on loaded models; ``write(report)`` is called after each part (partial results)."""
    import transformers

    write = write or (lambda report: None)
    card = torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else "cpu"
    report: dict[str, Any] = {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "gamma": opts.gamma,
                              "new_tokens": opts.new_tokens}
    with torch.no_grad():
        pixels = target.preprocess(raw_inputs("videollava"))
        visual = target.encode_pixels(pixels)
        length = target.prefill(visual, QUESTION).prompt_length
        fill = [_time_ms(lambda: target.prefill(visual, QUESTION), target.device) for _ in range(opts.concurrent_repeats + 2)]
        enc = [_time_ms(lambda: target.encode_pixels(pixels), target.device) for _ in range(opts.concurrent_repeats + 2)]
        report.update(prompt_tokens=length, prefill_ms=statistics.median(fill[1:]),
                      vision_encode_ms=statistics.median(enc[1:]))
        report.update(_prefill_variants(target, visual, length, opts.concurrent_repeats + 2))
        report["ours"] = _ours(target, visual, opts, length)
        if target.device.type == "cuda":
            report["gemv_floor_ms"] = {f"rows_{k}": gemv_floor_ms(target, k) for k in (1, opts.gamma + 1)}
            report["weight_gb"] = sum(p.numel() * p.element_size() for p in target.runner.language_model.layers
                                      .parameters()) / 1e9 + target.lm_head.weight.numel() * target.lm_head.weight.element_size() / 1e9
        mode, best = _best(report["ours"])
        report.update(decode_mode=mode, decode_ms_per_token=best["decode_ms_per_token"],
                      verify_over_decode=best["verify_over_decode"],
                      tree_verify_over_decode=best["tree_verify_over_decode"],
                      eagle_tree_verify_over_decode=best["eagle_tree_verify_over_decode"],
                      eagle_tree_routes=best["eagle_tree_routes"])
        write(report)
        eagle = _eagle(target, opts)
        decode = report["decode_ms_per_token"]
        step, commit = eagle.pop("step_ms"), eagle.pop("commit_ms")  # per drafted token / per proposal
        report.update(eagle, eagle_step_ms=step, eagle_commit_ms=commit, eagle_c=(step + commit / opts.gamma) / decode,
                      eagle_c_eager=(eagle["eagle_eager_step_ms"] + eagle["eagle_eager_commit_ms"] / opts.gamma)
                      / decode)
        if "eagle_tree_ms" in report:  # per tree (not per token): a tree's draft time / a decode step
            report.update(eagle_tree_c=report["eagle_tree_ms"] / decode,
                          eagle_tree_c_eager=report["eagle_tree_eager_ms"] / decode)
        report.update(_l5(draft, target, opts))
        if "l5_chain_proposal_ms" in report:  # the chain alone: the EventGPT forward that feeds it is extra
            report["l5_chain_c"] = report["l5_chain_proposal_ms"] / opts.gamma / decode
        write(report)
        graphs = [m for m in (draft, target) if m.device.type == "cuda"] if mode != "eager" else []
        for m in graphs:
            m.enable_cuda_graphs(4096, step_sizes=(1, opts.gamma + 1), kernels=mode == "fused_graph")
            m.enable_vision_graphs()
        report.update(best_concurrent_prefill(draft, target, opts.concurrent_repeats))
        report["concurrent_decode_mode"] = mode
        high = report["concurrency_variants"].get("a_threads_priority", {})
        if target.device.type == "cuda" and "concurrent_prefill_slowdown" in high:  # the draft's stream at high priority
            report["draft_high_priority"] = {"target_prefill_concurrent_ms": high["target_prefill_concurrent_ms"],
                                             "concurrent_prefill_slowdown": high["concurrent_prefill_slowdown"],
                                             "free_draft_tokens": high["free_draft_tokens"],
                                             "draft_prefill_end_concurrent_ms": high["draft_prefill_end_ms"]}
        for m in graphs:
            m.disable_cuda_graphs()
        write(report)
        if opts.baselines:
            report["baselines"] = _baselines(target, visual, opts)
            write(report)
    return report


def _prefill_variants(target, visual, length: int, repeats: int) -> dict[str, float]:
    """``prefill_llm_ms``: the LLM alone from ready embeddings; ``prefill_eager_ms``: the eager path (CUDA)."""
    out: dict[str, float] = {}
    embeds = target.padded_prompt_embeds(visual, QUESTION)

    def llm():
        target.runner.run(embeds, target.runner.new_cache(length + 128, target.dtype, target.device), all_logits=False)

    out["prefill_llm_ms"] = statistics.median([_time_ms(llm, target.device) for _ in range(repeats)][1:])
    if target.runner.use_prefill_kernels(target.device.type == "cuda"):
        target.runner.use_prefill_kernels(False)
        old = [_time_ms(lambda: target.prefill(visual, QUESTION), target.device) for _ in range(repeats)]
        target.runner.use_prefill_kernels(True)
        out["prefill_eager_ms"] = statistics.median(old[1:])
    return out


def quant4_report(target4, opts: EngineOptions) -> dict[str, Any]:
    """Prefill, decode ms/token and verify(gamma+1)/decode(1) of a 4-bit (nf4) target, per decode mode.

    With bitsandbytes alone (the default: its one-row GEMV, and its own path for the verify rows) and,
    where it runs, with the opt-in Triton nf4 kernel for few-row steps (``verify_over_decode_4bit_nf4_kernel``).
    """
    with torch.no_grad():
        visual = target4.encode_pixels(target4.preprocess(raw_inputs("videollava")))
        length = target4.prefill(visual, QUESTION).prompt_length
        fill = [_time_ms(lambda: target4.prefill(visual, QUESTION), target4.device) for _ in range(3)]
        out: dict[str, Any] = {"prefill_ms_4bit": statistics.median(fill[1:])}
        kernel = target4.runner.use_nf4_kernel(target4.device.type == "cuda")
        # the Triton nf4 kernels (CUDA only) for the multi-row steps, bitsandbytes for one row; then bitsandbytes alone
        runs = {"nf4_kernel": "triton", "nf4_kernel_tc": "triton_tc", "bnb": None} if kernel else {"bnb": None}
        for name, mode in runs.items():
            target4.runner.use_nf4_kernel(mode is not None, mode=mode or "triton")
            out[f"ours_4bit_{name}"] = _ours(target4, visual, opts, length)
        target4.runner.use_nf4_kernel(False)
    mode, best = _best(out["ours_4bit_bnb"])
    out.update(decode_mode_4bit=mode, decode_ms_per_token_4bit=best["decode_ms_per_token"],
               verify_over_decode_4bit=best["verify_over_decode"], verify_over_decode_4bit_bnb=best["verify_over_decode"])
    for name in ("nf4_kernel", "nf4_kernel_tc"):
        if f"ours_4bit_{name}" in out:
            out[f"verify_over_decode_4bit_{name}"] = _best(out[f"ours_4bit_{name}"])[1]["verify_over_decode"]
    return out


def _time_ms(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0)


def _baselines(target, visual, opts: EngineOptions) -> dict[str, Any]:
    """HF generate (static cache) and the torch.compile loop on the same weights, ms/token."""
    out: dict[str, Any] = {}
    hf = hf_generate(target, "static", opts.new_tokens)
    out["hf_generate_static_ms_per_token"] = hf.get("decode_ms_per_token_hf", hf.get("hf_static"))
    try:
        out["torch_compile_loop_ms_per_token"] = compiled_loop_ms(target, visual, opts.new_tokens)
    except Exception as exc:  # report, keep the rest
        out["torch_compile_loop_ms_per_token"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def run_engine_report(args, argv: list[str]) -> dict[str, Any]:
    """``real_shape_benchmark --engine``: build/load the 7B-shape pair on CUDA, measure, write the JSON."""
    from common.models.loader import load_vlm
    from common.models.real_shape import write_real_shape_pair

    if not torch.cuda.is_available():
        raise SystemExit("real_shape_benchmark --engine needs a CUDA device")
    paths = write_real_shape_pair(args.models_dir)
    draft = load_vlm("eventgpt", paths["eventgpt"], quant=args.quant, device="cuda")
    target = load_vlm("videollava", paths["videollava"], quant=args.quant, device="cuda")
    opts = EngineOptions(modes=[m for m in args.engine_modes.split(",") if m], new_tokens=args.new_tokens,
                         gamma=args.gamma, baselines=not args.no_baselines)
    path = Path(args.engine_json or Path(args.output_dir) / f"engine_{args.quant}.json")
    command = "python -m benchmark_inference.real_shape_benchmark " + " ".join(argv)

    def write(report: dict[str, Any]) -> None:
        atomic_write_json(path, {**report, "quant": args.quant, "command": command})

    report = engine_report(draft, target, opts, write)
    write(report)
    if args.quant == "bf16" and not args.no_4bit and importlib.util.find_spec("bitsandbytes") is not None:
        del draft, target
        torch.cuda.empty_cache()
        try:
            report.update(quant4_report(load_vlm("videollava", paths["videollava"], quant="4bit", device="cuda"),
                                        opts))
        except Exception as exc:  # report, keep the rest
            report["verify_over_decode_4bit"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        write(report)
    print({k: v for k, v in report.items() if k != "ours"}, flush=True)
    print(report["ours"], flush=True)
    return report
