"""Where a draft tree's verify step spends its time, at Video-LLaVA-7B shapes on CUDA (a diagnostic).

    python -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --output_dir results/tree_verify_profile

On the random real-shape target (``write_real_shape_pair``; graphs on the Triton kernels, the tree step
captured) it times, as medians of CUDA-synchronised wall clock: a 1-token forward; the parts of
``common.tree.verify_tree`` for the 16-row tree of the engine report (mask and positions, the row map, the
forward, the greedy accept); and the whole step, once on the target itself and once through ``EagleTarget``
(the EAGLE drafter's route, which records the final-layer features). A ``torch.profiler`` table of the
whole step on each route shows which calls hold the time. Writes ``results.json`` and ``profile_<route>.txt``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import torch

from benchmark_inference.real_shape_timing import QUESTION, TREE_PARENTS, raw_inputs, timed_median
from common.results import atomic_write_json, atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models_dir", default="results/real_shape_models",
                   help="where the random real-shape checkpoints are written (reused when present)")
    p.add_argument("--output_dir", default="results/tree_verify_profile", help="where results.json goes")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per figure (median)")
    return p


def parts_ms(model: Any, state: Any, repeats: int) -> dict[str, float]:
    """Median ms of a 1-token forward, of each part of a tree verify, and of the whole step, on ``model``."""
    from common.tree import (
        DraftTree,
        accept_tree_greedy,
        tree_attention_mask,
        tree_positions,
        tree_row_map,
        verify_tree,
    )

    device, base, logits = model.device, state.length, state.logits
    parents = list(TREE_PARENTS)
    tree = DraftTree(tokens=list(range(11, 11 + len(parents))), parents=parents)
    mask, positions = tree_attention_mask(parents, base, 1, device), tree_positions(parents, base, 1, device)

    def reset() -> None:
        model.truncate(state, base)
        state.logits = logits

    def forward(with_tree: bool) -> torch.Tensor:
        reset()
        if not with_tree:
            return model.forward(state, [10])
        return model.forward(state, [10] + tree.tokens, attn_mask=mask, position_ids=positions)

    rows = forward(True)
    timings = {
        "decode_ms": timed_median(lambda: forward(False), repeats, device)[0],
        "mask_and_positions_ms": timed_median(lambda: (tree_attention_mask(parents, base, 1, device),
                                                       tree_positions(parents, base, 1, device)), repeats, device)[0],
        "row_map_ms": timed_median(lambda: tree_row_map(mask, positions.reshape(-1), base), repeats, device)[0],
        "tree_forward_ms": timed_median(lambda: forward(True), repeats, device)[0],
        "accept_ms": timed_median(lambda: accept_tree_greedy(tree, rows[0], rows[1:]), repeats, device)[0],
        "verify_tree_ms": timed_median(lambda: (reset(), verify_tree(model, state, [10], tree, 0.0)), repeats,
                                       device)[0],
    }
    reset()
    return {k: 1000 * v for k, v in timings.items()}


def profile_table(model: Any, state: Any, steps: int = 5) -> str:
    """``torch.profiler`` of ``steps`` whole tree verify steps on ``model``: top calls by CPU and by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    from common.tree import DraftTree, verify_tree

    base, logits = state.length, state.logits
    tree = DraftTree(tokens=list(range(11, 11 + len(TREE_PARENTS))), parents=list(TREE_PARENTS))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.truncate(state, base)
            state.logits = logits
            verify_tree(model, state, [10], tree, 0.0)
        torch.cuda.synchronize()
    table = prof.key_averages()
    return (f"# {steps} tree verify steps\n\n## by CPU time (total)\n\n"
            + table.table(sort_by="cpu_time_total", row_limit=30)
            + "\n\n## by CUDA time (total)\n\n" + table.table(sort_by="cuda_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        raise SystemExit("tree_verify_profile needs a CUDA device (the tree step replays a CUDA graph)")
    from common.drafters.eagle_head import EagleTarget
    from common.models.decoding import counting_routes
    from common.models.loader import load_vlm
    from common.models.real_shape import write_real_shape_pair

    out = Path(args.output_dir)
    target = load_vlm("videollava", write_real_shape_pair(args.models_dir)["videollava"], device="cuda")
    report: dict[str, Any] = {"card": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
                              "torch": torch.__version__, "tree_rows": len(TREE_PARENTS) + 1}
    with torch.no_grad():
        visual = target.encode_pixels(target.preprocess(raw_inputs("videollava")))
        length = target.prefill(visual, QUESTION).prompt_length
        rows = len(TREE_PARENTS) + 1
        target.enable_cuda_graphs(length + 64, step_sizes=(1, 6, rows), kernels=True, tree_step=rows)
        report["kernels"] = target.runner.kernels_on
        for route, model in (("target", target), ("eagle", EagleTarget(target, -1))):
            state = model.prefill(visual, QUESTION)
            with counting_routes(target) as routes:
                report[route] = parts_ms(model, state, args.repeats)
            report[route]["routes"] = dict(sorted(routes.items()))
            atomic_write_text(out / f"profile_{route}.txt", profile_table(model, state))
            print(route, report[route], flush=True)
    atomic_write_json(out / "results.json", report)
    return report


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
