"""Does a model use its visual input? Teacher-forced loss with each clip's own visuals vs other clips'.

    python -m scripts.visual_reliance --dataset_dir data/synthetic_default --kind eventgpt --path models/eventgpt

Every clip is asked the top ``--max_questions`` questions; the answer tokens' cross-entropy and argmax
accuracy are computed once with the clip's own visual tokens and once with those of the next clips
(``--shifts``), per question group. A model that ignores its visuals scores the same both ways (the
shipped draft before ``--event_image_norm white``: gap 0.000 in every group); the gap is how much the
clip's own frames help.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.visual_reliance", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="synthetic clip dataset (ground truth answers)")
    p.add_argument("--split", default="test", help="split to use (default test; 'all' for every entry)")
    p.add_argument("--kind", choices=["eventgpt", "videollava"], required=True, help="which model")
    p.add_argument("--path", required=True, help="the model folder")
    p.add_argument("--max_clips", type=int, default=12, help="clips used (default 12; at least 2)")
    p.add_argument("--max_questions", type=int, default=50, help="top-N questions per clip (default 50)")
    p.add_argument("--shifts", type=int, default=2, help="other clips' visuals tried per clip (default 2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def reliance(vlm: Any, visuals: Any, clips: list, shifts: int) -> dict[str, dict[str, float]]:
    """Per question group: loss and accuracy with the clip's own visuals and with other clips' (``shifts`` each)."""
    import torch

    from common.training import answer_ids, batched_teacher_forced_loss, question_group

    sums: dict[tuple[str, bool], list[float]] = defaultdict(lambda: [0.0, 0, 0])
    layouts: dict = {}
    with torch.no_grad():
        for shift in range(shifts + 1):
            for ci, clip in enumerate(clips):
                by_group: dict[str, list] = defaultdict(list)
                for q, a in clip.qa:
                    by_group[question_group(q)].append((q, a))
                for group, qa in by_group.items():
                    pos = [(ci + shift) % len(clips)] * len(qa)
                    out = batched_teacher_forced_loss(vlm, visuals, pos, [q for q, _ in qa],
                                                      [answer_ids(vlm, a) for _, a in qa], layouts)
                    s = sums[(group, shift > 0)]
                    s[0] += float(out.loss) * out.tokens
                    s[1] += out.tokens
                    s[2] += out.correct
    table: dict[str, dict[str, float]] = {}
    for group in sorted({g for g, _ in sums}):
        own, other = sums[(group, False)], sums[(group, True)]
        table[group] = {"loss_own": own[0] / own[1], "loss_other": other[0] / other[1],
                        "accuracy_own": own[2] / own[1], "accuracy_other": other[2] / other[1]}
        table[group]["loss_gap"] = table[group]["loss_other"] - table[group]["loss_own"]
    return table


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the per-group table (and return it)."""
    args = build_parser().parse_args(argv)
    if args.max_clips < 2 or args.shifts < 1:
        raise SystemExit("--max_clips must be >= 2 and --shifts >= 1 (other clips' visuals are needed)")
    import torch

    from common.models.loader import load_vlm
    from common.training import encode_batch_tensor, group_by_clip, memoize_prompts, precompute_pixels

    split = None if args.split in ("", "all") else args.split
    clips = group_by_clip(args.dataset_dir, split, args.max_questions, args.max_clips)
    if len(clips) < 2:
        raise SystemExit(f"{args.dataset_dir}: fewer than 2 clips with answers in split {args.split!r}")
    vlm = memoize_prompts(load_vlm(args.kind, args.path, quant="fp32", device=args.device))
    vlm.model.eval()
    size = int(json.loads((Path(args.path) / "preprocessor_config.json").read_text())["crop_size"]["height"])
    pixels = precompute_pixels(args.kind, clips, args.path, size, 1, None)
    with torch.no_grad():
        visuals = torch.cat([encode_batch_tensor(vlm, pixels[i:i + 8].to(vlm.device).float())
                             for i in range(0, len(clips), 8)])
    table = reliance(vlm, visuals, clips, args.shifts)
    print("| group | loss own visuals | loss other clips' | gap | accuracy own | accuracy other |")
    print("|---|---|---|---|---|---|")
    for group, r in table.items():
        print(f"| {group} | {r['loss_own']:.3f} | {r['loss_other']:.3f} | {r['loss_gap']:.3f} | "
              f"{r['accuracy_own']:.3f} | {r['accuracy_other']:.3f} |")
    return table


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
