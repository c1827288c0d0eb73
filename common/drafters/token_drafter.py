"""What the benchmarks call: find a trained TokenAdapter, wrap it as a Drafter, summarise its live numbers.

    from common.drafters.token_drafter import aligned_metrics, find_latest_adapter, load_token_adapter_drafter

    path = find_latest_adapter()                      # newest finished run, or None
    drafter = load_token_adapter_drafter(path, egpt, egpt.prefill(visual_e, question),
                                         target_vocab_limit=min(egpt.base_vocab_size, vllava.base_vocab_size))
    result = speculative_generate(vllava, vllava.prefill(visual_v, question), drafter,
                                  max_new_tokens=50, gamma=5)
    pairs.append((raw_result, drafter.annotate(result)))   # raw_result: the plain EventGPT drafter's
    statistics.update(aligned_metrics(pairs))
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from common.defaults import REPO_ROOT as _REPO_ROOT
from common.drafters.token_adapter import CONFIG_NAME, WEIGHTS_NAME, TokenAdapter, TokenAdapterDrafter
from common.locations import find_with_legacy

DEFAULT_ROOT = "results/token_alignment"
LEGACY_ROOT = "token_alignment/task"  # where runs went before results/ (still searched, with a deprecation line)
CHECKPOINT_DIR = "checkpoint"


def _is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def _resolve_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_absolute() and not root.exists() and (_REPO_ROOT / root).exists():
        return _REPO_ROOT / root
    return root


def _trained_with(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / CONFIG_NAME).read_text()).get("extra", {}).get("trained_with", {}) or {}
    except (OSError, ValueError):
        return {}


def find_latest_adapter(root: str | os.PathLike = DEFAULT_ROOT, *, eventgpt_path: str | os.PathLike | None = None,
                        videollava_path: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint folder of the newest FINISHED training run under ``root`` (starred copies included).

    A run counts when ``<run>/DONE`` exists and ``<run>/checkpoint`` holds config.json and
    model.safetensors; newest = latest checkpoint weights modification time. With
    ``eventgpt_path``/``videollava_path`` only adapters trained on token pairs of those checkpoints
    count (an adapter made for another pair proposes poorly). A relative ``root`` that does not
    exist from the current directory is tried relative to the repository. The default root is
    results/token_alignment; runs left in the old token_alignment/task are still found.
    """
    if str(root) == DEFAULT_ROOT:
        root = find_with_legacy(DEFAULT_ROOT, LEGACY_ROOT, "TokenAdapter runs")
    root = _resolve_root(root)
    if not root.is_dir():
        return None
    want = {k: str(Path(p).resolve()) for k, p in (("egpt_model", eventgpt_path), ("videollava_model", videollava_path))
            if p is not None}
    found = []
    for run in list(root.iterdir()) + (list((root / "starred").iterdir()) if (root / "starred").is_dir() else []):
        ckpt = run / CHECKPOINT_DIR
        if not (run.is_dir() and (run / "DONE").is_file() and _is_checkpoint(ckpt)):
            continue
        if want:
            made = _trained_with(ckpt)
            if any((made.get(k) or {}).get("path") != v for k, v in want.items()):
                continue
        found.append(((ckpt / WEIGHTS_NAME).stat().st_mtime, run.name, ckpt))
    return max(found)[2] if found else None


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, device: str) -> TokenAdapter:
    return TokenAdapter.from_pretrained(path, device=device)


def load_token_adapter(path: str | os.PathLike, device: str | torch.device = "cpu") -> TokenAdapter:
    """A TokenAdapter from a checkpoint folder or a run folder (its checkpoint/); cached per (path, device)."""
    folder = Path(path)
    if not _is_checkpoint(folder) and _is_checkpoint(folder / CHECKPOINT_DIR):
        folder = folder / CHECKPOINT_DIR
    return _load_cached(str(folder.resolve()), str(torch.device(device)))


def load_token_adapter_drafter(path: str | os.PathLike | TokenAdapter, draft_model: Any, draft_state: Any,
                               target_vocab_limit: int, *, draft_tokens: list[int] | None = None,
                               device: str | torch.device | None = None, name: str = "token_adapter",
                               sync: Any = None, stop_token_ids: Iterable[int] = ()) -> TokenAdapterDrafter:
    """A Drafter (``propose(context, gamma)``) for ONE sample: the adapter over this draft model and state.

    ``draft_state`` is the draft's fresh prefill for the sample; ``draft_tokens`` the draft's own
    greedy answer if already drafted (e.g. the free tokens of a parallel prefill), else it is
    generated here. ``target_vocab_limit``: proposals stay below it (the shared base vocabulary,
    e.g. ``min(egpt.base_vocab_size, vllava.base_vocab_size)``). Loading is cached, so calling this
    per sample is cheap. Build a new drafter for every sample.
    """
    if isinstance(path, TokenAdapter):
        adapter = path
    else:
        if device is None:
            device = getattr(draft_model, "device", None) or "cpu"
        adapter = load_token_adapter(path, device)
    return TokenAdapterDrafter(adapter, draft_model=draft_model, draft_state=draft_state, draft_tokens=draft_tokens,
                               vocab_limit=target_vocab_limit, name=name, sync=sync, stop_token_ids=stop_token_ids)


def _field(result: Any, key: str) -> Any:
    if result is None:
        return None
    if isinstance(result, Mapping):
        return result.get(key)
    if isinstance(result, (int, float)) and key == "acceptance_rate":
        return float(result)
    return getattr(result, key, None)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def aligned_metrics(pairs: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """Per-sample live numbers of the adapter drafter beside the raw drafter's.

    ``pairs``: one ``(raw, aligned)`` per sample; each a ``SpecResult``, its ``to_dict()``, or (raw)
    a plain acceptance rate; ``aligned`` preferably ``TokenAdapterDrafter.annotate(result)`` (adds the
    live top-5 counts). Samples that drafted nothing are left out of the averages.

    Returns ``aligned_acceptance_rate_avg/std``, ``aligned_top5_rate_avg`` (share of verified draft
    positions whose target token was in the adapter's top 5), ``raw_acceptance_rate_avg/std``,
    ``aligned_improvement`` (aligned avg - raw avg, absolute), ``aligned_improvement_ratio``
    (aligned avg / raw avg), mean accepted lengths and the sample count.
    """
    aligned_rates, raw_rates, top5, aligned_len, raw_len = [], [], [], [], []
    n = 0
    for raw, aligned in pairs:
        n += 1
        a = _field(aligned, "acceptance_rate")
        if a is not None:
            aligned_rates.append(float(a))
        r = _field(raw, "acceptance_rate")
        if r is not None:
            raw_rates.append(float(r))
        t = _field(aligned, "top5_rate")
        if t is not None:
            top5.append(float(t))
        for res, out in ((aligned, aligned_len), (raw, raw_len)):
            m = _field(res, "mean_accepted_length")
            if m is not None:
                out.append(float(m))
    a_avg, a_std = _mean_std(aligned_rates)
    r_avg, r_std = _mean_std(raw_rates)
    return {
        "aligned_acceptance_rate_avg": a_avg,
        "aligned_acceptance_rate_std": a_std,
        "aligned_top5_rate_avg": _mean_std(top5)[0],
        "raw_acceptance_rate_avg": r_avg,
        "raw_acceptance_rate_std": r_std,
        "aligned_improvement": None if a_avg is None or r_avg is None else a_avg - r_avg,
        "aligned_improvement_ratio": None if a_avg is None or not r_avg else a_avg / r_avg,
        "aligned_mean_accepted_length_avg": _mean_std(aligned_len)[0],
        "raw_mean_accepted_length_avg": _mean_std(raw_len)[0],
        "aligned_num_samples": n,
    }
