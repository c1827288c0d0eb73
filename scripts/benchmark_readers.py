"""Benchmark the data layer: synthetic clip generation, mp4 -> 8 frames (direct, cache cold/warm),
event loading and event-image rendering.

Example:
    python -m scripts.benchmark_readers --output_dir results/benchmark_readers --num_clips 4

Writes <output_dir>/readers_<timestamp>/ with config.json, results.json (per-clip records +
statistics) and RESULTS.md, and prints the table. CPU only.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common.data import ClipDataset, read_image
from common.events import load_events, render_event_frames, render_event_image
from common.video import FrameCache, read_mp4_frames


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark_readers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="results/benchmark_readers", help="where the run folder goes")
    p.add_argument("--dataset_dir", default=None,
                   help="benchmark the readers on this existing dataset instead of a fresh synthetic one "
                        "(generation is then not timed)")
    p.add_argument("--num_clips", type=int, default=4, help="synthetic clips to generate and read (default 4)")
    p.add_argument("--duration", choices=["1s", "500ms"], default="1s")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--num_workers", type=int, default=2, help="generation processes (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_pickle", action="store_true", help="trust upstream pickled .npy event files")
    p.add_argument("--keep_data", action="store_true", help="keep the generated dataset in the run folder")
    return p


def _ms(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1000.0


def _generate(args: argparse.Namespace, data_dir: Path) -> dict:
    from scripts.make_synthetic_dataset import main as make

    common = ["--output_dir", str(data_dir), "--duration", args.duration, "--seed", str(args.seed),
              "--width", str(args.width), "--height", str(args.height)]
    one = make([*common, "--num_clips", "1", "--num_workers", "1", "--split", "test"])
    many = make([*common, "--num_clips", str(args.num_clips), "--num_workers", str(args.num_workers),
                 "--split", "train"])
    return {
        "generation_s_per_clip_1_worker": one["seconds"],
        "generation_clips_per_s": many["generated"] / many["seconds"] if many["seconds"] else None,
        "generation_workers": many["num_workers"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns {"statistics": ..., "run_dir": ...}."""
    from common.results import RunFolder, markdown_table, summarize

    args = build_parser().parse_args(argv)
    run = RunFolder.create("benchmark_readers", "readers", args.output_dir, resume=False)
    run.write_config(args, argv)
    stats: dict = {}
    tmp = None
    if args.dataset_dir:
        data_dir = Path(args.dataset_dir)
    else:
        data_dir = run.path / "data" if args.keep_data else Path(tempfile.mkdtemp(prefix="bench_readers_"))
        tmp = None if args.keep_data else data_dir
        stats.update(_generate(args, data_dir))
    try:
        dataset = ClipDataset(data_dir, allow_pickle=args.allow_pickle)
        samples = list(dataset)[: max(args.num_clips, 1)]
        cache = FrameCache(Path(tempfile.mkdtemp(prefix="bench_cache_")))
        records = []
        for s in samples:
            rec: dict = {"id": s.id}
            if s.video_path is not None:
                _, rec["mp4_direct_ms"] = _ms(read_mp4_frames, s.video_path, 8)
                _, rec["mp4_cache_cold_ms"] = _ms(cache.get, s.video_path, 8)
                _, rec["mp4_cache_warm_ms"] = _ms(cache.get, s.video_path, 8)
            stream, rec["load_events_ms"] = _ms(load_events, s.event_path, allow_pickle=args.allow_pickle)
            rec["num_events"] = len(stream)
            _, rec["render_5_frames_ms"] = _ms(render_event_frames, stream, 5)
            _, rec["render_1_frame_ms"] = _ms(render_event_image, stream)
            if len(s.event_image_paths) == 5:  # the stored PNGs themselves (--event_source images reads them)
                _, rec["event_png_5_load_ms"] = _ms(lambda paths: [read_image(p) for p in paths], s.event_image_paths)
            records.append(rec)
        shutil.rmtree(cache.cache_dir, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in records[0] if k != "id"] if records else []
    for k in keys:
        stats[k] = summarize([r.get(k) for r in records])
    for k in ("mp4_direct_ms", "mp4_cache_cold_ms", "mp4_cache_warm_ms"):
        mean = stats.get(k, {}).get("mean")
        stats[k.replace("_ms", "_clips_per_s")] = 1000.0 / mean if mean else None
    stats["events_per_clip_mean"] = float(np.mean([r["num_events"] for r in records])) if records else None

    rows = []
    if "generation_s_per_clip_1_worker" in stats:
        rows.append({"measure": "synthetic clip generation, 1 worker (s/clip)",
                     "value": stats["generation_s_per_clip_1_worker"]})
        rows.append({"measure": f"synthetic generation, {stats['generation_workers']} workers (clips/s)",
                     "value": stats["generation_clips_per_s"]})
    names = {"mp4_direct_ms": "mp4 -> 8 frames, direct decode (ms)",
             "mp4_cache_cold_ms": "mp4 -> 8 frames, cache cold (ms)",
             "mp4_cache_warm_ms": "mp4 -> 8 frames, cache warm (ms)",
             "load_events_ms": "load events file (ms)",
             "render_5_frames_ms": "render 5 event images (ms)",
             "render_1_frame_ms": "render 1 event image (ms)",
             "event_png_5_load_ms": "read 5 event-image PNGs (ms)"}
    for k, label in names.items():
        if k in stats:
            rows.append({"measure": label, "value": stats[k]["mean"]})
    rows.append({"measure": "events per clip (mean)", "value": stats["events_per_clip_mean"]})
    table = markdown_table(rows, ["measure", "value"], floatfmt=".2f")
    header = (f"# Data-layer reader benchmark\n\n{args.width}x{args.height}, {args.duration} clips, "
              f"{len(records)} clips read, CPU.\n\n")
    run.write_results(records, stats)
    run.write_markdown(header + table)
    run.mark_done()
    print(table)
    print(f"wrote {run.path}")
    return {"statistics": stats, "run_dir": str(run.path)}


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
