"""Write a synthetic clip dataset in the DSEC clip layout (events, mp4, frames, event images, Q&A).

Example:
    python -m scripts.make_synthetic_dataset --output_dir data/synthetic_1s --num_clips 100 \\
        --duration 1s --split test --seed 0

Clips are grouped in sequences of 10 (synthetic_{split}_seq_000, ...). Each clip's seed comes from
(seed, split, clip index), so output bytes do not depend on --num_workers. Finished clips are
skipped on a rerun (resumable); the index JSON merges with an existing one, so train and test can
share a folder, and an existing id with different content is refused.
"""

from __future__ import annotations

import argparse
import json

from common.events import MAX_SENSOR_SIDE
from common.synthetic_dataset import DURATIONS_MS, default_num_workers, write_synthetic_dataset


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.make_synthetic_dataset",
        description=__doc__.split("\n\n")[0] + " Deterministic for a seed; resumable; uses several cores.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--output_dir", required=True, help="dataset folder to write (created if missing)")
    p.add_argument("--num_clips", type=int, default=20, help="number of clips of this split (default 20)")
    p.add_argument("--duration", choices=sorted(DURATIONS_MS), default="1s", help="clip length: 1s = 20 frames")
    p.add_argument("--split", choices=["train", "test"], default="test", help="split name stored in the index")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--width", type=int, default=640, help="frame width, even (default 640)")
    p.add_argument("--height", type=int, default=480, help="frame height, even (default 480)")
    p.add_argument("--num_workers", type=int, default=default_num_workers(),
                   help="processes generating clips (default: 2 or the core count)")
    p.add_argument("--noise_rate", type=float, default=0.002,
                   help="noise events per pixel per second (default 0.002, ~600/s at 640x480)")
    p.add_argument("--no_ego_motion", action="store_true", help="keep the camera still in every clip")
    p.add_argument("--threshold", type=float, default=0.2, help="event contrast threshold C (default 0.2)")
    p.add_argument("--long_answers", action="store_true",
                   help="answer the key-elements and description questions at length (>= 40 tokens, "
                        "motion, colours and static things; marks each new ground truth answer_style: long; "
                        "clips already on disk keep theirs)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Generate the dataset; returns a summary dict (counts, timing, index path)."""
    args = build_parser().parse_args(argv)
    if args.width % 2 or args.height % 2:
        raise SystemExit("--width and --height must be even (yuv420p video)")
    if not (2 <= args.width <= MAX_SENSOR_SIDE and 2 <= args.height <= MAX_SENSOR_SIDE):
        raise SystemExit(f"--width and --height must be in 2..{MAX_SENSOR_SIDE} (the event loader's sensor limit)")
    if args.num_clips < 1 or args.num_workers < 1:
        raise SystemExit("--num_clips and --num_workers must be >= 1")
    summary = write_synthetic_dataset(
        args.output_dir, num_clips=args.num_clips, duration=args.duration, split=args.split, seed=args.seed,
        width=args.width, height=args.height, num_workers=args.num_workers, noise_rate=args.noise_rate,
        ego_motion=not args.no_ego_motion, threshold=args.threshold, long_answers=args.long_answers)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
