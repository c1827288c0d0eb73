"""PNG plots for run folders (matplotlib, Agg backend chosen inside each function).

Every function writes one PNG (parent folders created) and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.speculative import predicted_speedup

_DPI = 120
# What the timed stages are (the benchmarks' stage1..stage5); legends show these names.
STAGE_LABELS = {"stage1": "1 data load", "stage2": "2 preprocess", "stage3": "3 vision encode",
                "stage4": "4 LLM prefill", "stage5": "5 decode"}


def stage_label(label: str) -> str:
    """The legend text of an interval or stage label: ``stage4`` -> ``4 LLM prefill``; others unchanged."""
    return STAGE_LABELS.get(label, label)


def _wrap_title(title: str, fig_width_in: float, fontsize: float = 12.0) -> str:
    """``title`` broken into lines that fit a figure ``fig_width_in`` inches wide (no cut-off titles)."""
    import textwrap

    width = max(20, int(fig_width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(title, width)) if title else title


def _plt() -> Any:
    """pyplot on the non-interactive Agg backend (chosen here, never at import)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _unique(seq: Sequence[str]) -> list[str]:
    out: list[str] = []
    for s in seq:
        if s not in out:
            out.append(s)
    return out


def plot_stage_breakdown(
    stage_means: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "Stage breakdown"
) -> Path:
    """Stacked horizontal bars, one per model, of mean stage times given in **seconds** (drawn in ms).

    ``stage_means`` is e.g. ``{"eventgpt": {"stage1": 0.01, ...}, "videollava": {...}}``;
    each segment is annotated with its ms value (thin ones just above/below the bar) and
    each bar with its total.
    """
    plt = _plt()
    models = list(stage_means)
    stages = _unique([s for m in models for s in stage_means[m]])
    colors = _colors(stages)
    fig, ax = plt.subplots(figsize=(9, 1.4 + 1.1 * max(1, len(models))))
    totals = []
    grand = max((sum(float(v) for v in stage_means[m].values() if v is not None) for m in models), default=0.0)
    min_label_w = 0.04 * grand * 1000.0  # skip in-bar labels on slivers (the total still counts them)
    for y, model in enumerate(models):
        left = 0.0
        n_small = 0
        for stage in stages:
            v = stage_means[model].get(stage)
            if v is None:
                continue
            w = float(v) * 1000.0
            ax.barh(y, w, left=left, height=0.5, color=colors[stage], edgecolor="white",
                    label=stage_label(stage) if y == _first_model_with(stage_means, models, stage) else None)
            if w >= min_label_w and w > 0:
                ax.text(left + w / 2, y, f"{w:.1f}", ha="center", va="center", fontsize=8)
            elif w > 0:  # sliver: label outside the bar, alternating above/below
                above = n_small % 2 == 0
                ax.text(left + w / 2, y + (-0.27 if above else 0.27), f"{w:.1f}", ha="center",
                        va="bottom" if above else "top", fontsize=7)
                n_small += 1
            left += w
        totals.append(left)
    for y, tot in enumerate(totals):
        ax.text(tot, y, f"  {tot:.1f} ms", ha="left", va="center", fontsize=9, fontweight="bold")
    ax.set_yticks(range(len(models)), models)
    ax.set_ylim(len(models) - 0.4, -0.6)  # top to bottom, room for sliver labels
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    if totals:
        ax.set_xlim(0, max(max(totals), 1e-9) * 1.2)
    if stages:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(stages), 4), fontsize=8)
    return _save(fig, path)


def _first_model_with(stage_means: Mapping[str, Mapping[str, float]], models: list[str], stage: str) -> int:
    for i, m in enumerate(models):
        if stage_means[m].get(stage) is not None:
            return i
    return -1


def _draw_timeline(ax: Any, intervals: Sequence[Mapping[str, Any]], colors: dict[str, Any], scale: float) -> None:
    lanes = _unique([str(i.get("lane", i.get("thread", ""))) for i in intervals])
    seen: set[str] = set()
    for it in intervals:
        lane = str(it.get("lane", it.get("thread", "")))
        y = lanes.index(lane)
        start, end = float(it["start"]) * scale, float(it["end"]) * scale
        label = str(it["label"])
        ax.barh(y, max(end - start, 0.0), left=start, height=0.6, color=colors[label],
                edgecolor="black", linewidth=0.5, label=stage_label(label) if label not in seen else None)
        seen.add(label)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)


def plot_timeline(
    intervals: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Timeline", *, unit: str = "s"
) -> Path:
    """One row per lane (e.g. "draft", "target") with a coloured box per interval label; x in ms.

    ``intervals`` are dicts ``{label, start, end, lane}`` as :class:`common.timing.Clock`
    records them: times in seconds (``unit="s"``) or already in ms (``unit="ms"``).
    """
    return plot_timelines([intervals], path, [title], unit=unit)


def plot_timelines(
    list_of_intervals: Sequence[Sequence[Mapping[str, Any]]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    *,
    unit: str = "s",
) -> Path:
    """Several timelines (e.g. one per sample) as stacked subplots sharing colours per label."""
    if unit not in ("s", "ms"):
        raise ValueError(f"unit must be 's' or 'ms', got {unit!r}")
    scale = 1000.0 if unit == "s" else 1.0
    plt = _plt()
    n = max(1, len(list_of_intervals))
    labels = _unique([str(i["label"]) for ivs in list_of_intervals for i in ivs])
    colors = _colors(labels)
    heights = [0.6 + 0.5 * max(1, len({str(i.get("lane", i.get("thread", ""))) for i in ivs}))
               for ivs in list_of_intervals] or [1.0]
    fig, axes = plt.subplots(n, 1, figsize=(10, 0.8 + sum(heights) + 0.3 * n), squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        ivs = list_of_intervals[k] if k < len(list_of_intervals) else []
        _draw_timeline(ax, ivs, colors, scale)
        if titles is not None and k < len(titles):
            ax.set_title(titles[k], fontsize=10)
    if labels:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[lab]) for lab in labels]
        fig.legend(handles, [stage_label(lab) for lab in labels], loc="lower center", ncol=min(len(labels), 4),
                   fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.08 if labels else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def leviathan_speedup(acceptance: float, gamma: int, cost_ratio: float) -> float:
    """Expected wall-time speedup (1 - a^(g+1)) / ((1 - a)(g c + 1)); (g+1)/(g c+1) at a = 1."""
    return predicted_speedup(float(acceptance), int(gamma), float(cost_ratio))


def plot_speedup_vs_acceptance(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    gamma: int,
    cost_ratio: float,
    title: str | None = None,
) -> Path:
    """Measured (acceptance, speedup) points over the Leviathan prediction curve; dashed line at 1.0."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    a = np.linspace(0.0, 1.0, 201)
    ax.plot(a, [leviathan_speedup(x, gamma, cost_ratio) for x in a], color="C0",
            label=f"Leviathan prediction (γ={gamma}, c={cost_ratio:.3g})")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="no speedup")
    labelled = False
    for p in points:
        ax.scatter(float(p["acceptance"]), float(p["speedup"]), color="C3", zorder=3,
                   label="measured" if not labelled else None)
        labelled = True
        if p.get("label"):
            ax.annotate(str(p["label"]), (float(p["acceptance"]), float(p["speedup"])),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("acceptance rate α")
    ax.set_ylabel("speedup (×)")
    ax.set_title(title or "Speedup vs acceptance rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[str]]],
    title: str | None = None,
) -> Path:
    """One panel per ``(title, keys)``; each key is a curve over ``history[i]["epoch"]`` (or index).

    Missing or None values are skipped, so train/val curves logged at different steps work.
    """
    plt = _plt()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (ptitle, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = [], []
            for i, h in enumerate(history):
                v = h.get(key)
                if v is None:
                    continue
                xs.append(h.get("epoch", i))
                ys.append(float(v))
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(ptitle)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_bars(
    values: Mapping[str, float], path: str | Path, title: str = "", ylabel: str = "", *, ref: float | None = None,
    errors: Mapping[str, float | None] | None = None,
) -> Path:
    """A bar chart of ``values`` (e.g. speedup per drafter), each bar annotated; optional dashed ``ref`` line.

    ``errors`` (same keys, e.g. the per-sample std) draws error bars; the title wraps to the figure width.
    """
    plt = _plt()
    names = list(values)
    vals = [float(values[k]) if values[k] is not None else 0.0 for k in names]
    errs = [float((errors or {}).get(k) or 0.0) for k in names]
    width = max(5, 1.0 + 0.9 * len(names))
    fig, ax = plt.subplots(figsize=(width, 4))
    bars = ax.bar(range(len(names)), vals, color=[f"C{i % 10}" for i in range(len(names))],
                  yerr=errs if errors else None, capsize=4 if errors else 0)
    for b, v, e in zip(bars, vals, errs):
        text = f"{v:.3g} ± {e:.2g}" if errors and e else f"{v:.3g}"
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height() + e),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if ref is not None:
        ax.axhline(ref, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap_title(title, width))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
