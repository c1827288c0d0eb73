"""Write tiny random-weight EventGPT and Video-LLaVA checkpoints in the released on-disk formats.

    python -m scripts.make_tiny_models --output_dir DIR [--seed 0 --vocab_size 1000]

Writes DIR/eventgpt and DIR/videollava (config.json, model.safetensors, tokenizer files,
processor configs). The tokenizer is trained locally on the synthetic clip world's text;
both models share its base ids and each adds its own special tokens above them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.models.tiny import (
    TinySize,
    build_eventgpt,
    build_tokenizer,
    build_videollava,
    save_eventgpt,
    save_videollava,
    size_dict,
)

# The random pair: the target is larger and sees ~6x more visual tokens, like the real pair.
# Every width the 4-bit path quantizes is a multiple of 64, so bitsandbytes' packed CPU path
# (AVX512-BF16 CPUs: 64-wide blocks along in_features, 32-row blocks along out_features) runs.
EVENTGPT_SIZE = TinySize(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
VIDEOLLAVA_SIZE = TinySize(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256)


def tokenizer_corpus_default() -> list[str]:
    """The synthetic world's questions and answers (the text both tiny models speak)."""
    from common.synthetic import tokenizer_corpus

    return tokenizer_corpus()


def make_tiny_models(output_dir: str | Path, seed: int = 0, vocab_size: int = 1000,
                     eventgpt_size: TinySize = EVENTGPT_SIZE, videollava_size: TinySize = VIDEOLLAVA_SIZE,
                     corpus: list[str] | None = None) -> dict:
    """Build, save and describe both tiny checkpoints; returns their paths and sizes."""
    out = Path(output_dir)
    tokenizer = build_tokenizer(corpus if corpus is not None else tokenizer_corpus_default(), vocab_size)
    egpt, egpt_tok = build_eventgpt(tokenizer, eventgpt_size, seed=seed)
    vllava, vllava_tok = build_videollava(tokenizer, videollava_size, seed=seed + 1)
    paths = {
        "eventgpt": save_eventgpt(egpt, egpt_tok, out / "eventgpt", eventgpt_size),
        "videollava": save_videollava(vllava, vllava_tok, out / "videollava", videollava_size),
    }
    summary = {
        "output_dir": str(out),
        "seed": seed,
        "base_vocab_size": tokenizer.vocab_size,
        "eventgpt": {"path": str(paths["eventgpt"]), "size": size_dict(eventgpt_size),
                     "parameters": sum(p.numel() for p in egpt.parameters())},
        "videollava": {"path": str(paths["videollava"]), "size": size_dict(videollava_size),
                       "parameters": sum(p.numel() for p in vllava.parameters())},
    }
    (out / "tiny_models.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder that receives eventgpt/ and videollava/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--vocab_size", type=int, default=1000,
                        help="target size of the shared base vocabulary (default 1000)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    summary = make_tiny_models(args.output_dir, seed=args.seed, vocab_size=args.vocab_size)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
