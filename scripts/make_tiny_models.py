"""Write tiny random-weight EventGPT and Video-LLaVA checkpoints in the released on-disk formats.

    python -m scripts.make_tiny_models --output_dir DIR [--seed 0 --vocab_size 1000]

Writes DIR/eventgpt and DIR/videollava (config.json, model.safetensors, tokenizer files,
processor configs). The tokenizer is trained locally on the synthetic clip world's text;
both models share its base ids and each adds its own special tokens above them.
The library function is :func:`common.models.tiny.make_tiny_models`.
"""

from __future__ import annotations

import argparse
import json

from common.models.tiny import EVENTGPT_SIZE, VIDEOLLAVA_SIZE, make_tiny_models
from common.synthetic import tokenizer_corpus as tokenizer_corpus_default

__all__ = ["EVENTGPT_SIZE", "VIDEOLLAVA_SIZE", "build_parser", "main", "make_tiny_models", "tokenizer_corpus_default"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder that receives eventgpt/ and videollava/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--vocab_size", type=int, default=1000,
                        help="target size of the shared base vocabulary (default 1000)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Write both checkpoints and print their summary."""
    args = build_parser().parse_args(argv)
    summary = make_tiny_models(args.output_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
