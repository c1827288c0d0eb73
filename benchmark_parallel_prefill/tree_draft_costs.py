"""What one EAGLE-2 draft tree costs at the 7B head's shapes, without loading any target (seconds on one GPU).

    python -m benchmark_parallel_prefill.tree_draft_costs --output_dir results/tree_draft_costs \
        [--tree_topk 4 --tree_tokens 16 --context 50 --steps 30 --sharpness 1,4,16 --decode_ms 4.89]
    python -m benchmark_parallel_prefill.tree_draft_costs --tiny --device cpu --output_dir /tmp/tree_costs

A random EAGLE head shaped like one Video-LLaVA-7B decoder layer (4096 wide, 32 heads, MLP 11008; bf16 on
CUDA) bound to a random 32000 x 4096 LM head and embedding table. Per ``--sharpness`` s (the LM head scaled by
s: a confident head, as a trained one is, grows deeper trees) it measures (``drafter_costs.eagle_tree_costs``)
one ``--tree_topk/--tree_tokens`` tree on the head's static chain (CUDA graphs on CUDA, one replay and one host
read per depth) and by the eager reference (one eager head step per depth), with host reads, plus the tree's
depth, the root alone and the cost per further depth. c per tree = tree ms / ``--decode_ms`` (the target's
decode step: default the twin's 4.89 ms on the H200, docs/PERFORMANCE.md). Writes results.json and RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import torch

from benchmark_parallel_prefill.drafter_costs import eagle_tree_costs
from common.cli import resolve_device
from common.drafters.eagle_head import EagleHead, EagleHeadConfig
from common.errors import DataError
from common.results import atomic_write_json, atomic_write_text, markdown_table
from common.tree import add_tree_args, tree_config_from

SHAPES = {"7b": (4096, 32, 11008, 32000), "tiny": (64, 4, 128, 500)}  # hidden, heads, MLP, vocabulary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_parallel_prefill.tree_draft_costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="a 64-wide head (CPU smoke test) instead of the 7B shapes")
    p.add_argument("--context", type=int, default=50, help="head rows committed before the tree (default 50)")
    p.add_argument("--steps", type=int, default=30, help="timed repetitions per measurement (median; default 30)")
    p.add_argument("--sharpness", default="1,4,16", help="comma-separated LM-head scales (default 1,4,16)")
    p.add_argument("--decode_ms", type=float, default=4.89, help="the target's decode step for c (default 4.89)")
    p.add_argument("--output_dir", default="results/tree_draft_costs", help="folder for results.json and RESULTS.md")
    add_tree_args(p)  # default --tree_topk 4 --tree_tokens 16
    return p


def _sharpness(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise DataError(f"--sharpness: positive comma-separated numbers, e.g. 1,4,16 (got {text!r})")
    return values


def make_head(shapes: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> tuple[EagleHead, Any]:
    """A random head of ``shapes`` bound to a random LM head (returned: scale it in place) and embedding table."""
    hidden, heads, inter, vocab = shapes
    torch.manual_seed(0)
    head = EagleHead(EagleHeadConfig(hidden_size=hidden, num_heads=heads, intermediate_size=inter))
    head = head.to(device, dtype).eval()
    lm = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden ** 0.5
    embed = torch.randn(vocab, hidden, device=device, dtype=dtype)
    return head.bind(lm_head=lm, embed_tokens=embed, vocab_limit=vocab), lm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config = tree_config_from(args.tree_topk, args.tree_tokens, args.tree_depth) or tree_config_from(4, 16)
    scales = _sharpness(args.sharpness)
    device = resolve_device(args.device)
    graphs = device.type == "cuda"
    dtype = torch.bfloat16 if graphs else torch.float32
    head, lm = make_head(SHAPES["tiny" if args.tiny else "7b"], device, dtype)
    rows, done = [], 1.0
    for scale in scales:
        lm.mul_(scale / done)  # the graphs read the same LM-head tensor: scale it in place
        done = scale
        costs = eagle_tree_costs(head, args.context, config, args.steps, graphs=graphs)
        rows.append({"sharpness": scale, **costs, "c": costs["ms"] / args.decode_ms,
                     "c_eager": costs["eager_ms"] / args.decode_ms})
    name = torch.cuda.get_device_name(device) if graphs else "cpu"
    out = {"device": name, "date": dt.date.today().isoformat(), "torch": torch.__version__, "argv": argv,
           "tree_topk": config.topk, "tree_tokens": config.tokens, "tree_depth": config.max_depth, "decode_ms": args.decode_ms,
           "mode": "graph" if graphs else "static", "dtype": str(dtype), "rows": rows}
    table = markdown_table(rows, floatfmt=".3f")
    folder = Path(args.output_dir)
    atomic_write_json(folder / "results.json", out)
    atomic_write_text(folder / "RESULTS.md", f"# EAGLE draft-tree cost ({name}, {out['mode']}, {dtype})\n\n"
                      f"`python -m benchmark_parallel_prefill.tree_draft_costs {' '.join(argv)}`\n\n"
                      f"topk {config.topk}, {config.tokens} rows per tree; c = ms per tree / {args.decode_ms} ms "
                      f"(target decode step).\n\n{table}\n")
    print(table)
    return out


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
