"""Widen the trained pair to the Vicuna-7B LLM shape (or a CPU-sized 'small' shape) with the same answers.

    python -m scripts.widen_pair --output_dir DIR [--shape 7b|small] [--eventgpt_path P --videollava_path P]
        [--save_dtype auto|float16|bfloat16|float32] [--check [N]]
        [--eagle_head P] [--hidden_adapter P[,P...]] [--token_adapter P]

Writes DIR/eventgpt and DIR/videollava in the released on-disk formats (load them with
``--eventgpt_path DIR/eventgpt --videollava_path DIR/videollava``) and DIR/widen_pair.json.
The widened pair computes the trained pair's function (see common/models/widen.py for how), while
every LLM step costs what a step of the larger shape costs; the visual prompt is padded with
masked positions to the real visual token counts (7b: EventGPT 582, Video-LLaVA 2056).
``--check N`` then answers N clips of the default split (or --dataset_dir) with both pairs in
float32 on the CPU and prints how many answers are token-identical (meant for ``--shape small``).
Defaults: the shipped pair (models/) and --shape 7b.

Trained drafters of the pair (any subset of ``--eagle_head``, ``--hidden_adapter``, ``--token_adapter``)
are widened with it into DIR/drafters/ (eagle_head/, hidden_adapter/L<level>.safetensors,
token_adapter/, drafters.json), in their usual formats: on the twin each proposes exactly the tokens
it proposes on the small pair (common/drafters/widen.py says how). Everything is checked before
anything is written; a drafter that cannot be widened exactly stops the run with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    from common.models.widen import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder that receives eventgpt/ and videollava/")
    parser.add_argument("--shape", choices=SHAPES, default="7b",
                        help="7b: Vicuna-7B LLM (hidden 4096, 32 layers, 32 heads, MLP 11008); "
                             "small: every dimension and the depth doubled (CPU tests)")
    parser.add_argument("--eventgpt_path", default=None, help="EventGPT checkpoint to widen (default: the shipped one)")
    parser.add_argument("--videollava_path", default=None,
                        help="Video-LLaVA checkpoint to widen (default: the shipped one)")
    parser.add_argument("--save_dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype on disk (auto: float16 for 7b, float32 for small)")
    parser.add_argument("--check", type=int, nargs="?", const=3, default=0, metavar="N",
                        help="compare greedy answers of both pairs on N clips (default N: 3) after writing")
    parser.add_argument("--dataset_dir", default=None, help="clips for --check (default: the default split)")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="answer length limit for --check")
    g = parser.add_argument_group("trained drafters of the pair, widened into DIR/drafters")
    g.add_argument("--eagle_head", default=None, help="EAGLE head checkpoint (folder, or a training folder with best/)")
    g.add_argument("--hidden_adapter", default=None, metavar="PATH[,PATH...]",
                   help="hidden-state adapter checkpoints (L1-L5), comma-separated")
    g.add_argument("--token_adapter", default=None, help="TokenAdapter checkpoint (or its run folder)")
    return parser


def drafter_sources(args: argparse.Namespace):
    """The :class:`common.drafters.widen.DrafterSources` of the drafter flags."""
    from common.drafters.widen import DrafterSources

    hidden = tuple(p.strip() for p in (args.hidden_adapter or "").split(",") if p.strip())
    return DrafterSources(eagle_head=args.eagle_head, hidden_adapters=hidden, token_adapter=args.token_adapter)


def main(argv: list[str] | None = None) -> dict:
    from common.defaults import resolve_dataset_dir, resolve_model_paths
    from common.drafters.widen import prepare_drafters, write_drafters
    from common.errors import DataError
    from common.models.widen import compare_answers, prepare, widen_pair

    args = build_parser().parse_args(argv)
    egpt, vllava = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    dtype_name = args.save_dtype if args.save_dtype != "auto" else ("float16" if args.shape == "7b" else "float32")
    sources = drafter_sources(args)
    try:
        jobs = prepare_drafters(sources, prepare("eventgpt", egpt, args.shape),
                                prepare("videollava", vllava, args.shape)) if sources else []
        if jobs and (Path(args.output_dir) / "drafters").exists():
            raise DataError(f"{Path(args.output_dir) / 'drafters'}: already exists; pass another --output_dir or remove it")
        summary = widen_pair(args.output_dir, egpt, vllava, shape_name=args.shape, dtype=DTYPES[dtype_name])
        if jobs:
            summary["drafters"] = write_drafters(jobs, args.output_dir)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    print(json.dumps(summary, indent=2))
    if args.check:
        out = Path(args.output_dir)
        report = compare_answers({"eventgpt": egpt, "videollava": vllava},
                                 {"eventgpt": out / "eventgpt", "videollava": out / "videollava"},
                                 resolve_dataset_dir(args.dataset_dir), num_clips=args.check,
                                 max_new_tokens=args.max_new_tokens)
        for kind in ("eventgpt", "videollava"):
            r = report[kind]
            print(f"{kind}: {r['match']}/{r['total']} answers token-identical to the source model")
        summary["check"] = report
    return summary


if __name__ == "__main__":
    main()
