"""Tests for common/plots.py: every function writes a non-empty PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(p: Path) -> bool:
    return p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def test_stage_breakdown(tmp_path: Path) -> None:
    means = {
        "eventgpt": {"stage1_load": 0.002, "stage3_vision_encode": 0.01, "stage4_prefill": 0.08, "stage5_decode": 0.5},
        "videollava": {"stage1_load": 0.01, "stage3_vision_encode": 0.02, "stage4_prefill": 0.3,
                       "stage5_decode": 0.7, "extra": 0.0},
    }
    p = plots.plot_stage_breakdown(means, tmp_path / "sub" / "stages.png", "Stage times")
    assert Path(p) == tmp_path / "sub" / "stages.png" and _is_png(Path(p))


def test_timeline_and_timelines(tmp_path: Path) -> None:
    ivs = [
        {"label": "draft_prefill", "start": 0.0, "end": 0.05, "lane": "draft"},
        {"label": "draft_decode", "start": 0.05, "end": 0.09, "lane": "draft"},
        {"label": "target_prefill", "start": 0.0, "end": 0.07, "lane": "target"},
        {"label": "verify", "start": 0.09, "end": 0.1, "lane": "target"},
    ]
    assert _is_png(plots.plot_timeline(ivs, tmp_path / "tl.png", "sample 0"))
    ms = [{**i, "start": i["start"] * 1000, "end": i["end"] * 1000} for i in ivs]
    assert _is_png(plots.plot_timeline(ms, tmp_path / "tl_ms.png", "ms", unit="ms"))
    assert _is_png(plots.plot_timelines([ivs, ivs[:2]], tmp_path / "tls.png", ["a", "b"]))
    with pytest.raises(ValueError):
        plots.plot_timeline(ivs, tmp_path / "x.png", unit="min")


def test_leviathan_speedup_values() -> None:
    assert plots.leviathan_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert plots.leviathan_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)
    assert plots.leviathan_speedup(1.0 - 1e-7, 4, 0.1) == pytest.approx(5 / 1.4, rel=1e-5)
    a, g, c = 0.6, 5, 0.2
    assert plots.leviathan_speedup(a, g, c) == pytest.approx((1 - a ** (g + 1)) / ((1 - a) * (g * c + 1)))


def test_speedup_vs_acceptance(tmp_path: Path) -> None:
    pts = [{"acceptance": 0.05, "speedup": 0.9, "label": "raw"}, {"acceptance": 0.3, "speedup": 1.1}]
    assert _is_png(plots.plot_speedup_vs_acceptance(pts, tmp_path / "sp.png", gamma=5, cost_ratio=0.2))
    assert _is_png(plots.plot_speedup_vs_acceptance([], tmp_path / "sp0.png", gamma=3, cost_ratio=0.0))


def test_training_curves(tmp_path: Path) -> None:
    hist = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1) if e % 2 else None,
             "cosine": 0.5 + 0.05 * e, "acc@0.90": 0.1 * e} for e in range(6)]
    panels = [("loss", ["train_loss", "val_loss"]), ("cosine", ["cosine"]), ("acceptance", ["acc@0.90", "missing"])]
    assert _is_png(plots.plot_training_curves(hist, tmp_path / "curves.png", panels))


def test_bars(tmp_path: Path) -> None:
    assert _is_png(plots.plot_bars({"raw": 0.98, "L1": 1.1, "L4": 1.3}, tmp_path / "b.png", "Speedup", "x", ref=1.0))
