"""Where a draft tree's verify step spends its time, at Video-LLaVA-7B shapes on CUDA (a diagnostic).

    python -m benchmark_inference.tree_verify_profile --models_dir /tmp/rs1 --output_dir results/tree_verify_profile

On the random real-shape target (``write_real_shape_pair``), or the checkpoint ``--videollava_path`` (e.g. a
twin's), with graphs on the Triton kernels and the tree step captured (``--fixed_step N``: every step padded
to N rows, as the benchmarks' lossless numerics do), it times, as medians of CUDA-synchronised wall clock: a
1-token forward; the parts of ``common.tree.verify_tree`` for the 16-row tree of the engine report (mask and
positions, the row map, the forward, the greedy accept, the KV compaction); and the whole step, once on the
target itself and once through ``EagleTarget`` (the EAGLE drafter's route, which records the final-layer
features). The tree holds the target's own next three tokens on one path, so each verify accepts three
and compacts. A ``torch.profiler`` table of the whole step on each route shows which calls hold the time.
Writes ``results.json`` and ``profile_<route>.txt``.
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
    p.add_argument("--videollava_path", default=None, help="a Video-LLaVA checkpoint instead of the random one")
    p.add_argument("--fixed_step", type=int, default=None, help="pad every step to this many rows (16 or more)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per figure (median)")
    return p


ACCEPTED = (0, 4, 11)  # a path of TREE_PARENTS, three deep: the target's own next tokens go there


def oracle_tree(model: Any, state: Any) -> tuple[int, Any]:
    """(pending token, tree): the target's greedy next tokens, the first as pending and three on ``ACCEPTED``."""
    from common.tree import DraftTree

    base, logits = state.length, state.logits
    tokens = [int(logits.argmax())]
    for _ in ACCEPTED:
        tokens.append(int(model.forward(state, [tokens[-1]])[-1].argmax()))
    model.truncate(state, base)
    state.logits = logits
    tree_tokens = [11 + i for i in range(len(TREE_PARENTS))]
    for node, token in zip(ACCEPTED, tokens[1:]):
        tree_tokens[node] = token
    return tokens[0], DraftTree(tokens=tree_tokens, parents=list(TREE_PARENTS))


def parts_ms(model: Any, state: Any, repeats: int) -> dict[str, float]:
    """Median ms of a 1-token forward, of each part of a tree verify, and of the whole step, on ``model``."""
    from common.tree import accept_tree_greedy, tree_attention_mask, tree_positions, tree_row_map, verify_tree

    device, base, logits = model.device, state.length, state.logits
    parents = list(TREE_PARENTS)
    pending, tree = oracle_tree(model, state)
    mask, positions = tree_attention_mask(parents, base, 1, device), tree_positions(parents, base, 1, device)
    keep = [0] + [1 + node for node in ACCEPTED]

    def reset() -> None:
        model.truncate(state, base)
        state.logits = logits

    def forward(with_tree: bool) -> torch.Tensor:
        reset()
        if not with_tree:
            return model.forward(state, [pending])
        return model.forward(state, [pending] + tree.tokens, attn_mask=mask, position_ids=positions)

    rows = forward(True)
    path, _ = accept_tree_greedy(tree, rows[0], rows[1:])
    timings = {
        "decode_ms": timed_median(lambda: forward(False), repeats, device)[0],
        "mask_and_positions_ms": timed_median(lambda: (tree_attention_mask(parents, base, 1, device),
                                                       tree_positions(parents, base, 1, device)), repeats, device)[0],
        "row_map_ms": timed_median(lambda: tree_row_map(mask, positions.reshape(-1), base), repeats, device)[0],
        "tree_forward_ms": timed_median(lambda: forward(True), repeats, device)[0],
        "accept_ms": timed_median(lambda: accept_tree_greedy(tree, rows[0], rows[1:]), repeats, device)[0],
        "forward_and_compact_ms": timed_median(lambda: (forward(True), model.compact(state, base, keep)), repeats,
                                               device)[0],
        "verify_tree_ms": timed_median(lambda: (reset(), verify_tree(model, state, [pending], tree, 0.0)), repeats,
                                       device)[0],
    }
    reset()
    return {**{k: 1000 * v for k, v in timings.items()}, "accepted": len(path)}


def profile_table(model: Any, state: Any, steps: int = 5) -> str:
    """``torch.profiler`` of ``steps`` whole tree verify steps on ``model``: top calls by CPU and by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    from common.tree import verify_tree

    base, logits = state.length, state.logits
    pending, tree = oracle_tree(model, state)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.truncate(state, base)
            state.logits = logits
            verify_tree(model, state, [pending], tree, 0.0)
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
    rows = len(TREE_PARENTS) + 1
    if args.fixed_step is not None and args.fixed_step < rows:
        raise SystemExit(f"--fixed_step must be at least the tree's {rows} rows, got {args.fixed_step}")
    path = args.videollava_path or write_real_shape_pair(args.models_dir)["videollava"]
    target = load_vlm("videollava", path, device="cuda")
    report: dict[str, Any] = {"card": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
                              "torch": torch.__version__, "videollava_path": str(path), "tree_rows": rows,
                              "fixed_step": args.fixed_step}
    with torch.no_grad():
        visual = target.encode_pixels(target.preprocess(raw_inputs("videollava")))
        length = target.prefill(visual, QUESTION).prompt_length
        step = args.fixed_step or rows
        target.enable_cuda_graphs(length + 4 * step, step_sizes=(1, 6, step), kernels=True, tree_step=step,
                                  fixed_step=args.fixed_step)
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
