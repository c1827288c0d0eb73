"""Concatenate sharded token files (one per rank or --chunk_idx) into one, in shard order.

    python -m token_alignment.merge_tokens data/token_alignment/train.part_00_of_02.jsonl \\
        data/token_alignment/train.part_01_of_02.jsonl --output_file data/token_alignment/train.jsonl

Each part's record parts are merged per sample id (as a resumed extraction leaves them), then
the parts are concatenated in the order given (= global sample order for contiguous shards) and
written atomically, one line per sample. ``extract_tokens`` launched with accelerate/torchrun
does this itself on rank 0 once every rank has finished.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.results import atomic_write_text, dumps_json
from token_alignment.pairs import is_complete, merge_files


def merge_token_files(parts: Sequence[str | Path], output_file: str | Path) -> dict:
    """Write the parts' samples (in part order) to ``output_file`` atomically; returns counts."""
    merged = merge_files(parts, missing="token part file not found")
    text = "".join(dumps_json(r, indent=None) + "\n" for r in merged.values())
    atomic_write_text(Path(output_file), text)
    complete = sum(int(is_complete(r)) for r in merged.values())
    return {"output_file": str(output_file), "num_samples": len(merged), "num_complete": complete,
            "parts": [str(p) for p in parts]}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m token_alignment.merge_tokens", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("parts", nargs="+", help="token part files, in shard order")
    p.add_argument("--output_file", required=True, help="merged JSON Lines file (written atomically)")
    args = p.parse_args(argv)
    out = merge_token_files(args.parts, args.output_file)
    print(f"{out['output_file']}: {out['num_samples']} samples ({out['num_complete']} complete) from "
          f"{len(out['parts'])} parts")
    return out


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
