"""Extraction throughput at the real 7B shapes (random weights), per teacher-forcing batch size.

    python -m feature_alignment.benchmark_extraction [--batch_sizes 1,8,16,24 --num_samples 48 \\
        --max_new_tokens 50 --layers -1,-2 --questions_per_clip 10 --target_states greedy_pass \\
        --device cuda --output_dir results/feature_alignment]

Builds EventGPT (Vicuna-7B shapes: hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000,
CLIP ViT-L/14-336 tower, projector, feature adaptor; 5 event frames -> 582 event tokens) and
Video-LLaVA (Vicuna-7B shapes, vocab 32064, CLIP ViT-L/14-224, 8 frames -> 2056 video tokens)
with random bf16 weights directly on the device (nothing is downloaded or written to disk),
then runs the extraction's own code path (:func:`extract_batch`: the target's batched greedy
answers with its states recorded on the way, the draft teacher-forced in one padded batch, then
the chunk write) over random frames, and reports per batch size: samples/s, seconds per sample
split into encode / target greedy pass / draft teacher-forced pass / chunk write, and peak GPU
memory. As in the extraction, a clip is encoded once for its ``--questions_per_clip`` questions.
A short untimed warm-up runs first; the device is synchronised around every timer.

``--tiny`` runs the same path with small random models on CPU (a smoke test of the script).
The tokenizer is a small local one (ids < ~1000), so prompts are a few tokens shorter than
Vicuna's; the visual tokens, which dominate the prompt (~641 and ~2100 tokens), are exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.results import atomic_write_json, to_jsonable
from common.timing import sync
from feature_alignment.extract_hidden_states import (
    TARGET_STATES,
    extract_batch,
    join_list_flags,
    parse_layers,
)
from feature_alignment.hidden_store import write_chunk

log = logging.getLogger(__name__)

QUESTIONS = ["What are the key elements in this scene?", "Describe the scene in detail.",
             "Is there any vehicle moving in the scene?", "What is the weather like?"]


def _llama(hidden: int, layers: int, heads: int, ffn: int, vocab: int, positions: int) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def _vision(hidden: int, layers: int, heads: int, image: int, patch: int = 14) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image, patch_size=patch, projection_dim=768, hidden_act="quick_gelu")


SHAPES = {
    "7b": {"llm": dict(hidden=4096, layers=32, heads=32, ffn=11008, positions=4096),
           "egpt_vision": dict(hidden=1024, layers=24, heads=16, image=336),
           "vl_vision": dict(hidden=1024, layers=24, heads=16, image=224), "egpt_vocab": 32000, "vl_vocab": 32064},
    "tiny": {"llm": dict(hidden=64, layers=2, heads=4, ffn=128, positions=4096),
             "egpt_vision": dict(hidden=32, layers=2, heads=2, image=56),
             "vl_vision": dict(hidden=32, layers=2, heads=2, image=56), "egpt_vocab": 1024, "vl_vocab": 1088},
}


def build_models(shapes: str, device: torch.device, dtype: torch.dtype):
    """(draft, target) behind the uniform interface, random weights created on ``device``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    from common.models.eventgpt import EventChatConfig, EventGPTForCausalLM, register_eventgpt
    from common.models.eventgpt_vlm import EventGPTVLM
    from common.models.tiny import EVENTGPT_SPECIAL, VIDEOLLAVA_SPECIAL, build_tokenizer
    from common.models.videollava_vlm import VideoLlavaVLM
    from common.models.vision import clip_image_processor
    from common.synthetic import tokenizer_corpus

    s = SHAPES[shapes]
    base = build_tokenizer(tokenizer_corpus(), 1000)
    register_eventgpt()
    e_tok = _copy(base)
    e_tok.add_tokens(EVENTGPT_SPECIAL, special_tokens=True)
    v_tok = _copy(base)
    v_tok.add_tokens(VIDEOLLAVA_SPECIAL, special_tokens=True)
    v_tok.pad_token = "<pad>"
    llm = s["llm"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ev = s["egpt_vision"]
            e_config = EventChatConfig(
                mm_visual_tower="openai/clip-vit-large-patch14-336",
                visual_tower_config=_vision(ev["hidden"], ev["layers"], ev["heads"], ev["image"]),
                mm_hidden_size=ev["hidden"], event_feature_adaptor=True, mm_use_im_start_end=False,
                mm_use_im_patch_token=True, architectures=["EventGPTForCausalLM"],
                **_llama(llm["hidden"], llm["layers"], llm["heads"], llm["ffn"], s["egpt_vocab"], llm["positions"]))
            e_model = EventGPTForCausalLM(e_config).eval()
            vv = s["vl_vision"]
            patches = (vv["image"] // 14) ** 2
            text = LlamaConfig(**{**_llama(llm["hidden"], llm["layers"], llm["heads"], llm["ffn"], s["vl_vocab"],
                                           llm["positions"]), "pad_token_id": v_tok.convert_tokens_to_ids("<pad>")})
            v_config = VideoLlavaConfig(
                vision_config=CLIPVisionConfig(**_vision(vv["hidden"], vv["layers"], vv["heads"], vv["image"])),
                text_config=text, image_token_index=v_tok.convert_tokens_to_ids("<image>"),
                video_token_index=v_tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_seq_length=patches,
                video_seq_length=8 * (patches + 1))
            v_model = VideoLlavaForConditionalGeneration(v_config).eval()
    finally:
        torch.set_default_dtype(previous)
    draft = EventGPTVLM(e_model, e_tok, clip_image_processor(None, s["egpt_vision"]["image"]))
    target = VideoLlavaVLM(v_model, v_tok, clip_image_processor(None, s["vl_vision"]["image"]))
    return draft, target


def _copy(tokenizer):
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _frames(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 255, (n, 480, 640, 3), dtype=np.uint8)


def run_batch_size(draft, target, batch_size: int, num_samples: int, layers: Sequence[int], max_new_tokens: int,
                   device: torch.device, folder: Path, seed: int = 0, questions_per_clip: int = 10,
                   target_states: str = "greedy_pass") -> dict[str, Any]:
    """Extraction over ``num_samples`` random samples in batches of ``batch_size``; timings and memory."""
    rng = np.random.default_rng(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {"encode": 0.0, "chunk_write": 0.0}
    stats: dict[str, Any] = {}
    positions = 0
    sync(device)
    start = time.perf_counter()
    done = 0
    clip: tuple[Any, ...] = ()
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        t0 = time.perf_counter()
        d_vis, t_vis = [], []
        with torch.no_grad():
            for i in range(done, done + n):
                if i % questions_per_clip == 0 or not clip:  # a new clip
                    clip = (draft.encode_pixels(draft.preprocess(list(_frames(rng, 5)))),
                            target.encode_pixels(target.preprocess(_frames(rng, 8))))
                d_vis.append(clip[0])
                t_vis.append(clip[1])
        sync(device)
        times["encode"] += time.perf_counter() - t0
        questions = [QUESTIONS[(done + i) % len(QUESTIONS)] for i in range(n)]
        records = extract_batch(draft, target, [f"s{done + i}" for i in range(n)], d_vis, t_vis, questions, layers,
                                max_new_tokens, stats, target_states=target_states)
        sync(device)
        t0 = time.perf_counter()
        write_chunk(folder / f"bench_{batch_size}.safetensors", records, layers)
        times["chunk_write"] += time.perf_counter() - t0
        positions += sum(r.length for r in records)
        done += n
    sync(device)
    seconds = time.perf_counter() - start
    out = {
        "batch_size": batch_size, "num_samples": num_samples, "seconds": seconds,
        "samples_per_second": num_samples / seconds, "positions": positions,
        "mean_answer_tokens": positions / num_samples,
        "seconds_per_sample": {
            "encode": times["encode"] / num_samples,
            "target_greedy": stats.get("generate_seconds", 0.0) / num_samples,
            "teacher_forced": stats.get("teacher_forced_seconds", 0.0) / num_samples,
            "chunk_write": times["chunk_write"] / num_samples,
        },
        "self_check_rate": (stats["self_check_matches"] / stats["self_check_positions"]
                            if stats.get("self_check_positions") else None),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feature_alignment.benchmark_extraction", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch_sizes", default="1,8,16,24",
                   help="samples decoded and teacher-forced together (extraction's --batch_size). Default: 1,8,16,24.")
    p.add_argument("--num_samples", type=int, default=48, help="samples timed per batch size. Default: 48.")
    p.add_argument("--questions_per_clip", type=int, default=10,
                   help="consecutive samples sharing one clip's encoding (extraction's --max_questions). Default: 10.")
    p.add_argument("--target_states", choices=TARGET_STATES, default="greedy_pass",
                   help="as extraction's --target_states. Default: greedy_pass.")
    p.add_argument("--max_new_tokens", type=int, default=50, help="target answer length cap. Default: 50.")
    p.add_argument("--layers", type=parse_layers, default=[-1, -2], help="stored layers. Default: -1,-2.")
    p.add_argument("--device", default="cuda", help="Default: cuda.")
    p.add_argument("--tiny", action="store_true", help="small random models (CPU smoke test of this script).")
    p.add_argument("--output_dir", default=None, help="also write benchmark_extraction.json there. Default: none.")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(join_list_flags(sys.argv[1:] if argv is None else argv))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --tiny --device cpu for a smoke test")
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    draft, target = build_models("tiny" if args.tiny else "7b", device, dtype)
    build_seconds = time.perf_counter() - t0
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    result: dict[str, Any] = {
        "shapes": "tiny" if args.tiny else "7b", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "layers": args.layers, "max_new_tokens": args.max_new_tokens,
        "questions_per_clip": args.questions_per_clip, "target_states": args.target_states,
        "build_seconds": build_seconds, "torch": torch.__version__, "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in sizes:
            common = dict(questions_per_clip=args.questions_per_clip, target_states=args.target_states)
            # untimed warm-up of this batch size (kernels, the batched decode's CUDA graph)
            run_batch_size(draft, target, size, size, args.layers, args.max_new_tokens, device, folder,
                           seed=args.seed + 99, **common)
            run = run_batch_size(draft, target, size, args.num_samples, args.layers, args.max_new_tokens, device,
                                 folder, seed=args.seed, **common)
            result["runs"].append(run)
            sp = run["seconds_per_sample"]
            print(f"batch {size:>3}: {run['samples_per_second']:.3f} samples/s | per sample: encode {sp['encode']:.3f}s, "
                  f"target greedy {sp['target_greedy']:.3f}s ({run['mean_answer_tokens']:.0f} tokens), teacher-forced "
                  f"{sp['teacher_forced']:.3f}s, write {sp['chunk_write']:.3f}s"
                  + (f" | peak {run['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in run else ""), flush=True)
    if args.output_dir:
        atomic_write_json(Path(args.output_dir) / "benchmark_extraction.json", result)
    print(json.dumps(to_jsonable(result), indent=2))
    return result


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
