"""Train a hidden-state adapter (L1-L5) from extracted states, streaming one chunk at a time.

    python -m feature_alignment.train_hidden_adapter --train_dir data/feature_alignment/hidden/train \\
        --adapter_level 1 [--task_name L1 --epochs 50 --batch_size 64 \\
        --lr 1e-3 --early_stopping 5 --val_fraction 0.1 --val_dir DIR --test_dir DIR]

Data: chunks are read one at a time in a shuffled order (per epoch) and shuffled within, so
memory holds about one chunk (two while the next is read) whatever the dataset size.
Validation uses samples held out of the training folder (``--val_fraction``, chosen by a hash
of the sample id, or of its clip with ``--val_by clip``), or the folder ``--val_dir``; a test
split is refused for validation. ``--test_dir`` is only evaluated once, with the best
checkpoint, at the end.

Loss per position t: ``mse_weight`` x relative squared error + ``cos_weight`` x (1 - cosine)
between the mapped and the target's state, + ``token_weight`` x cross-entropy of the target
LM head's logits on the mapped state against the target's token t (what greedy acceptance
needs). L5 adds the same terms for its next-state prediction (row t -> state t + 1), times
``next_weight``.

Metrics per epoch (train and validation): loss, mean cosine, acc@0.80/0.85/0.90/0.95 (share of
positions whose cosine exceeds the threshold), and token top-1/top-5 through the target's
LM head (saved by the extraction; ids outside the shared base vocabulary are masked, as the
drafter masks them). Outputs in the run folder ``results/feature_alignment/<task_name>_<timestamp>/``
(``--results_dir``, ``--task_name``; default task L<level>; ``--output_dir DIR`` names the exact folder):
config.json, history.json, results.json, RESULTS.md, training_curves.png, best.safetensors, and
last.safetensors + last_optimizer.safetensors + train_state.json to resume (on by default: the
newest unfinished folder of the task continues), DONE when finished.
Default ``--train_dir``: data/feature_alignment/hidden/train (the old feature_alignment/hidden/train
is still found, with a deprecation line).

Several GPUs (DistributedDataParallel through accelerate; plain python = one process):
    accelerate launch --num_processes N -m feature_alignment.train_hidden_adapter ...
Every rank streams the same chunk order and takes its contiguous share of each global batch
(``--batch_size`` stays the global batch); each rank's loss is its share of the global batch's
position sums, so the averaged gradients equal one process's update on the whole batch. Metrics
are summed across ranks; only the main process writes checkpoints, plots and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import resolve_device, run_cli, set_seed, shard
from common.lazy import no_grad
from common.locations import find_with_legacy, results_dir
from common.progress import progress
from common.results import (
    RunFolder,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
    to_jsonable,
)
from common.run_index import results_root_of, update_index

if TYPE_CHECKING:  # heavy imports happen inside the functions, so --help prints fast
    import numpy as np
    import torch

    from common.drafters.hidden_adapter import (
        BaseAdapter,
    )
    from feature_alignment.hidden_store import HiddenStore

log = logging.getLogger(__name__)

STAGE = "feature_alignment"
ADAPTER_LEVELS = (1, 2, 3, 4, 5)  # the keys of common.drafters.hidden_adapter.LEVELS (kept torch-free for --help)
DEFAULT_TRAIN_DIR = Path("data") / STAGE / "hidden" / "train"
LEGACY_TRAIN_DIR = Path(STAGE) / "hidden" / "train"
THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
STATE_FILE = "train_state.json"
# Arguments that must match to resume a run folder.
RESUME_KEYS = ("train_dir", "val_dir", "adapter_level", "batch_size", "lr", "weight_decay", "num_layers", "num_heads",
               "ffn_dim", "d_model", "bottleneck", "dropout", "val_fraction", "val_by", "input_layer", "target_layer",
               "mse_weight", "cos_weight", "token_weight", "next_weight", "seed", "max_positions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feature_alignment.train_hidden_adapter",
                                description="Train a hidden-state adapter (L1-L5) on extracted EventGPT -> "
                                            "Video-LLaVA states.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--train_dir", type=str, default=None,
                   help="extraction folder of the train split. Default: data/feature_alignment/hidden/train.")
    g.add_argument("--val_dir", type=str, default=None,
                   help="separate validation extraction (never the test split). Default: none, hold out "
                        "--val_fraction of --train_dir.")
    g.add_argument("--test_dir", type=str, default=None,
                   help="extraction folder evaluated once with the best checkpoint at the end. Default: none.")
    g.add_argument("--val_fraction", type=float, default=0.1, help="share of train samples held out. Default: 0.1.")
    g.add_argument("--val_by", choices=("sample", "clip"), default="sample",
                   help="hold out whole samples, or whole clips (all questions of a clip). Default: sample.")
    g.add_argument("--input_layer", type=int, default=-1, help="EventGPT layer the adapter reads. Default: -1.")
    g.add_argument("--target_layer", type=int, default=-1,
                   help="Video-LLaVA layer it predicts (-1 feeds the LM head: needed for token metrics). Default: -1.")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter_level", type=int, choices=ADAPTER_LEVELS, required=True,
                   help="1 bottleneck, 2 three bottlenecks, 3 wide bottleneck, 4 attention, 5 EAGLE-style.")
    g.add_argument("--bottleneck", type=int, default=None,
                   help="bottleneck width. Default: 256 (L3: 1024), shrunk for tiny hidden sizes.")
    g.add_argument("--num_layers", type=int, default=None, help="attention blocks (L4/L5). Default: 1.")
    g.add_argument("--num_heads", type=int, default=None, help="attention heads (L4/L5). Default: 8.")
    g.add_argument("--ffn_dim", type=int, default=None, help="FFN width (L4/L5). Default: 2 x d_model.")
    g.add_argument("--d_model", type=int, default=None,
                   help="attention width. Default: min(H_in, 1024) for L4, H_out for L5.")
    g.add_argument("--max_positions", type=int, default=None, help="L5 position table size. Default: 2048.")
    g.add_argument("--dropout", type=float, default=None, help="dropout. Default: 0.")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=50, help="maximum epochs. Default: 50.")
    g.add_argument("--batch_size", type=int, default=64, help="samples (sequences) per step. Default: 64.")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate. Default: 1e-3.")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay. Default: 0.01.")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0 = off). Default: 1.0.")
    g.add_argument("--early_stopping", type=int, default=5,
                   help="stop after this many epochs without a better --monitor (0 = off). Default: 5.")
    g.add_argument("--monitor", choices=("val_loss", "val_top1"), default="val_loss",
                   help="validation metric that picks the best checkpoint. Default: val_loss.")
    g.add_argument("--mse_weight", type=float, default=1.0, help="weight of the relative MSE. Default: 1.")
    g.add_argument("--cos_weight", type=float, default=1.0, help="weight of (1 - cosine). Default: 1.")
    g.add_argument("--token_weight", type=float, default=1.0,
                   help="weight of the LM-head cross-entropy against the target's tokens. Default: 1.")
    g.add_argument("--next_weight", type=float, default=1.0, help="L5: weight of the next-state terms. Default: 1.")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", type=str, default=None,
                   help="this exact run folder (kept for old commands). Default: a new "
                        "<results_dir>/<task_name>_<YYYYMMDD_HHMMSS>/ (or the newest unfinished one, with --resume).")
    g.add_argument("--results_dir", type=str, default=str(results_dir(STAGE)),
                   help=f"base folder of the run folders. Default: {results_dir(STAGE)}.")
    g.add_argument("--task_name", type=str, default=None, help="run name. Default: L<adapter_level>.")
    g.add_argument("--device", type=str, default="auto", help="cpu, cuda, ... Default: auto.")
    g.add_argument("--seed", type=int, default=0, help="seed (init, held-out split, shuffling). Default: 0.")
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from last.safetensors + train_state.json when present. Default: on.")
    g.add_argument("--no_resume", dest="resume", action="store_false", help="start over.")
    return p


# ----------------------------------------------------------------------------- held-out split

def _hash(text: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{text}".encode())


def clip_of(sample_id: str) -> str:
    """The clip id of a sample id ("{clip}" or "{clip}_q{k}")."""
    head, sep, tail = sample_id.rpartition("_q")
    return head if sep and tail.isdigit() else sample_id


def held_out_ids(ids: Sequence[str], fraction: float, seed: int = 0, by: str = "sample") -> set[str]:
    """A deterministic held-out subset: the ``fraction`` of groups (samples or clips) with the smallest hash.

    Independent of chunking and order; at least one group when ``fraction > 0`` and more than
    one group exists.
    """
    if fraction <= 0:
        return set()
    key = clip_of if by == "clip" else (lambda s: s)
    groups = sorted({key(s) for s in ids}, key=lambda g: (_hash(g, seed), g))
    if len(groups) < 2:
        return set()
    n = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    chosen = set(groups[:n])
    return {s for s in ids if key(s) in chosen}


# ----------------------------------------------------------------------------- losses and metrics

class Meter:
    """Sums over positions of one pass: loss, cosine, acc@thresholds, top-1/top-5 (and L5's next-state ones)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.loss_sum = 0.0
        self.loss_batches = 0

    def add(self, name: str, value: float, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + int(count)

    def result(self, prefix: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"{prefix}_loss": self.loss_sum / self.loss_batches if self.loss_batches else None}
        for name, total in self.sums.items():
            n = self.counts[name]
            out[f"{prefix}_{name}"] = total / n if n else None
        return out


def position_terms(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, lm_head: torch.Tensor | None,
                   vocab_limit: int | None, weights: dict[str, float], meter: Meter | None, tag: str = "",
                   denom: float | None = None) -> torch.Tensor:
    """Loss over valid positions (pred/target (N, H), ids (N,)) and metric sums into ``meter``.

    ``denom``: divide the position sums by this count instead of N (a rank's share of a global
    batch of ``denom`` positions); None = the mean over these N positions.
    """
    import torch
    import torch.nn.functional as F

    rel = ((pred - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-6)
    cos = F.cosine_similarity(pred, target, dim=-1)
    if denom is None:
        loss = weights["mse"] * rel.mean() + weights["cos"] * (1.0 - cos).mean()
    else:
        loss = (weights["mse"] * rel.sum() + weights["cos"] * (1.0 - cos).sum()) / denom
    logits = None
    if lm_head is not None:
        logits = pred @ lm_head.t()
        if weights["token"] > 0:
            ce = F.cross_entropy(logits, ids) if denom is None else F.cross_entropy(logits, ids, reduction="sum") / denom
            loss = loss + weights["token"] * ce
    if meter is not None:
        n = pred.shape[0]
        with torch.no_grad():
            meter.add(f"{tag}cos", cos.sum().item(), n)
            meter.add(f"{tag}rel_mse", rel.sum().item(), n)
            if not tag:
                for thr in THRESHOLDS:
                    meter.add(f"acc@{thr:.2f}", (cos > thr).sum().item(), n)
            if logits is not None:
                masked = logits.detach().float()
                if vocab_limit is not None and vocab_limit < masked.shape[-1]:
                    masked[:, vocab_limit:] = float("-inf")
                top = masked.topk(min(5, masked.shape[-1]), dim=-1).indices
                meter.add(f"{tag}top1", (top[:, 0] == ids).sum().item(), n)
                meter.add(f"{tag}top5", (top == ids[:, None]).any(-1).sum().item(), n)
    return loss


def batch_loss(adapter: BaseAdapter, x: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               lm_head: torch.Tensor | None, vocab_limit: int | None, weights: dict[str, float],
               meter: Meter | None, denoms: tuple[float, float] | None = None) -> torch.Tensor:
    """Loss of one padded batch (x (B, T, H_in), h (B, T, H_out), ids/mask (B, T)).

    ``denoms``: (positions, next-state positions) of the global batch this is a share of; None =
    means over this batch.
    """
    module = getattr(adapter, "module", adapter)  # DistributedDataParallel wraps the adapter
    aligned, nxt = adapter(x, tokens=ids if module.predicts_next else None)
    loss = position_terms(aligned[mask], h[mask], ids[mask], lm_head, vocab_limit, weights, meter,
                          denom=denoms[0] if denoms else None)
    if nxt is not None and weights["next"] > 0 and mask.shape[1] > 1:
        m = mask[:, 1:]
        if m.any():
            loss = loss + weights["next"] * position_terms(nxt[:, :-1][m], h[:, 1:][m], ids[:, 1:][m], lm_head,
                                                           vocab_limit, weights, meter, tag="next_",
                                                           denom=denoms[1] if denoms else None)
    return loss


def pad_batch(chunk, spans: Sequence[tuple[int, int]], device: torch.device):
    """Right-padded float32 tensors of some samples of a chunk."""
    import torch

    longest = max(b - a for a, b in spans)
    n = len(spans)
    x = torch.zeros((n, longest, chunk.x.shape[1]), dtype=torch.float32)
    h = torch.zeros((n, longest, chunk.h.shape[1]), dtype=torch.float32)
    ids = torch.zeros((n, longest), dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        x[i, : b - a] = chunk.x[a:b]
        h[i, : b - a] = chunk.h[a:b]
        ids[i, : b - a] = chunk.target_ids[a:b]
        mask[i, : b - a] = True
    return x.to(device), h.to(device), ids.to(device), mask.to(device)


def _batch_denoms(batch: Sequence[tuple[int, int]], next_on: bool) -> tuple[float, float]:
    """(positions, next-state positions) of one global batch: the loss divides its sums by these."""
    lengths = [e - a for a, e in batch]
    return float(sum(lengths)), float(sum(max(n - 1, 0) for n in lengths)) if next_on else 1.0


def _reduce_meter(meter: Meter, local_loss: float, positions: int, accelerator: Any, device: torch.device) -> int:
    """Add up the meter's sums (and ``local_loss``, ``positions``) over every rank; no-op in one process."""
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        meter.loss_sum = local_loss
        return positions
    import torch
    import torch.distributed as dist

    keys: list[list[str]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(keys, sorted(meter.sums))  # keys in a fixed order known to all ranks
    names = sorted({k for ks in keys for k in ks})
    values = [local_loss, float(positions)] + [meter.sums.get(k, 0.0) for k in names] + \
        [float(meter.counts.get(k, 0)) for k in names]
    total = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduction="sum").tolist()
    meter.loss_sum = total[0]
    meter.sums = dict(zip(names, total[2:2 + len(names)]))
    meter.counts = {k: int(round(v)) for k, v in zip(names, total[2 + len(names):])}
    return int(round(total[1]))


def run_pass(adapter: BaseAdapter, store: HiddenStore, selected: set[str] | None, *, batch_size: int,
             input_layer: int, target_layer: int, lm_head: torch.Tensor | None, vocab_limit: int | None,
             weights: dict[str, float], device: torch.device, optimizer: torch.optim.Optimizer | None = None,
             grad_clip: float = 0.0, rng: np.random.Generator | None = None, desc: str = "",
             accelerator: Any = None) -> dict[str, Any]:
    """One streamed pass over ``store`` (training when ``optimizer`` is given); returns metric means.

    ``selected``: sample ids to use (None = all). Chunks are visited in a shuffled order and
    samples shuffled within a chunk when ``rng`` is given; one chunk is held at a time.
    The same loop serves one process and many (``accelerator``, None = one process): every rank
    takes its contiguous share of each global batch and divides its loss sums by the global
    batch's positions, so the gradients DDP averages equal one process's update on the whole
    batch; metric sums are added up across ranks.
    """
    import torch

    train = optimizer is not None
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    module = getattr(adapter, "module", adapter)  # DistributedDataParallel wraps the adapter
    model = adapter if train else module  # evaluation needs no gradient sync
    model.train(train)
    next_on = module.predicts_next and weights["next"] > 0
    meter = Meter()
    order = list(range(len(store.chunks)))
    if rng is not None:
        order = [int(i) for i in rng.permutation(len(order))]
    positions, local_loss = 0, 0.0
    for chunk in progress(store.iter_chunks(input_layer, target_layer, order), desc, "chunk", total=len(order),
                          disable=accelerator is not None and not accelerator.is_main_process):
        spans = [chunk.span(i) for i, sid in enumerate(chunk.sample_ids) if selected is None or sid in selected]
        spans = [s for s in spans if s[1] > s[0]]
        if rng is not None:
            spans = [spans[int(i)] for i in rng.permutation(len(spans))]
        for b in range(0, len(spans), batch_size):
            batch = spans[b:b + batch_size]
            mine = shard(batch, world, rank)
            # more ranks than samples in this batch: a forward on the batch's first sample, weighted 0,
            # so DDP's gradient sync still sees this rank (zero gradients)
            x, h, ids, mask = pad_batch(chunk, mine or batch[:1], device)
            with torch.set_grad_enabled(train):
                loss = batch_loss(model, x, h, ids, mask, lm_head, vocab_limit, weights,
                                  meter if mine else None, _batch_denoms(batch, next_on)) * float(bool(mine))
            positions += int(mask.sum()) if mine else 0
            if train:
                optimizer.zero_grad(set_to_none=True)
                if accelerator is not None:
                    accelerator.backward(loss * world)  # DDP averages gradients over ranks: undo the 1/world
                else:
                    loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
            local_loss += float(loss.detach())
            meter.loss_batches += 1
        del chunk  # hold one chunk at a time
    positions = _reduce_meter(meter, local_loss, positions, accelerator, device)
    out = meter.result("train" if train else "val")
    out["positions"] = positions
    return out


@no_grad
def evaluate(adapter: BaseAdapter, store: HiddenStore, selected: set[str] | None = None, *, batch_size: int = 64,
             input_layer: int = -1, target_layer: int = -1, lm_head: torch.Tensor | None = None,
             vocab_limit: int | None = None, weights: dict[str, float] | None = None,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Offline metrics of ``adapter`` on a hidden-state folder (keys without the ``val_`` prefix)."""
    import torch

    weights = weights or {"mse": 1.0, "cos": 1.0, "token": 1.0, "next": 1.0}
    out = run_pass(adapter, store, selected, batch_size=batch_size, input_layer=input_layer,
                   target_layer=target_layer, lm_head=lm_head, vocab_limit=vocab_limit, weights=weights,
                   device=torch.device(device), desc="evaluate")
    return {k.removeprefix("val_"): v for k, v in out.items()}


# ----------------------------------------------------------------------------- checkpoints and resume

def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON metadata (param groups, scalars)."""
    import torch
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    metadata = {"param_groups": json.dumps(to_jsonable(sd["param_groups"])), "scalars": json.dumps(to_jsonable(scalars))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    state: dict[int, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        for key in f.keys():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    for key, v in json.loads(md.get("scalars", "{}")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})


def _better(value: float | None, best: float | None, monitor: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


# ----------------------------------------------------------------------------- reporting

def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def results_markdown(summary: dict[str, Any], history: list[dict[str, Any]]) -> str:
    from common.drafters.hidden_adapter import LEVELS

    c = summary["adapter_config"]
    best = summary.get("best") or {}
    lines = [
        f"# Hidden adapter L{c['level']} ({LEVELS[c['level']]})",
        "",
        f"EventGPT layer {summary['input_layer']} (H={c['hidden_in']}) -> Video-LLaVA layer "
        f"{summary['target_layer']} (H={c['hidden_out']}); {summary['num_parameters']:,} parameters.",
        f"Data: {summary['train_samples']} train samples, {summary['val_samples']} validation samples "
        f"({summary['val_source']}), {summary['num_chunks']} chunks streamed one at a time.",
        f"Stopped after epoch {summary['epochs_run']} ({summary['stop_reason']}); best epoch "
        f"{summary.get('best_epoch')} by {summary['monitor']}.",
        "",
        "## Best epoch (validation)",
        "",
        "| cosine | acc@0.80 | acc@0.85 | acc@0.90 | acc@0.95 | top-1 | top-5 |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join([_fmt(best.get("val_cos"))] + [_fmt(best.get(f"val_acc@{t:.2f}"), True) for t in THRESHOLDS]
                         + [_fmt(best.get("val_top1"), True), _fmt(best.get("val_top5"), True)]) + " |",
    ]
    if best.get("val_next_cos") is not None:
        lines += ["", f"L5 next-state prediction: cosine {_fmt(best.get('val_next_cos'))}, top-1 "
                      f"{_fmt(best.get('val_next_top1'), True)}, top-5 {_fmt(best.get('val_next_top5'), True)}."]
    test = summary.get("test")
    if test:
        lines += ["", "## Test split (best checkpoint, evaluated once)", "",
                  f"cosine {_fmt(test.get('cos'))}, acc@0.90 {_fmt(test.get('acc@0.90'), True)}, top-1 "
                  f"{_fmt(test.get('top1'), True)}, top-5 {_fmt(test.get('top5'), True)} over {test.get('positions')} positions."]
    lines += ["", "## Epochs", "", "| epoch | train loss | val loss | val cos | val acc@0.90 | val top-1 | val top-5 | s |",
              "|---|---|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['epoch']} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('val_loss'))} | {_fmt(h.get('val_cos'))} "
                     f"| {_fmt(h.get('val_acc@0.90'), True)} | {_fmt(h.get('val_top1'), True)} "
                     f"| {_fmt(h.get('val_top5'), True)} | {h.get('seconds', 0):.1f} |")
    lines += ["", "acc@t = share of positions whose cosine with the target's state exceeds t. top-1 = share of "
                  "positions where the target LM head's argmax on the mapped state equals the target's own token "
                  "(teacher-forced: the acceptance of a one-token draft there); ids outside the shared base vocabulary "
                  "are masked as the drafter masks them.", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    from common.plots import plot_training_curves

    panels = [("loss", ["train_loss", "val_loss"]),
              ("cosine similarity", ["train_cos", "val_cos", "val_next_cos"]),
              ("acceptance proxies", [*(f"val_acc@{t:.2f}" for t in THRESHOLDS), "val_top1", "val_top5",
                                      "val_next_top1"])]
    plot_training_curves(history, path, panels, title=title)


# ----------------------------------------------------------------------------- main

def _lm_head(store: HiddenStore, device: torch.device) -> tuple[torch.Tensor | None, dict[str, Any]]:
    import torch

    from feature_alignment.hidden_store import load_lm_head

    path = store.lm_head_path()
    if path is None:
        log.warning("%s: no lm_head.safetensors; token loss and top-1/top-5 are off", store.root)
        return None, {}
    weight, meta = load_lm_head(path)
    return weight.to(device, torch.float32), meta


def run_folder(args: argparse.Namespace, accelerator: Any) -> Path:
    """``--output_dir`` as given, else ``<results_dir>/<task_name>_<timestamp>`` (the newest unfinished
    one with --resume); every rank gets the same folder (rank 0 picks it)."""
    if args.output_dir:
        out = Path(args.output_dir)
    else:
        task = args.task_name or f"L{args.adapter_level}"
        out = RunFolder.create(STAGE, task, output_dir=args.results_dir, resume=args.resume).path \
            if accelerator.is_main_process else Path()
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            out = Path(broadcast_object_list([str(out)])[0])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    return out


def epoch_line(row: dict[str, Any], monitor: str, best: bool) -> str:
    """One short line per epoch, e.g. ``epoch 3: train loss 0.512 | val loss 0.498 cos 0.812 top1 0.41 | 2.1 s *``."""
    def pick(prefix: str) -> str:
        parts = [f"{name} {row[f'{prefix}_{key}']:.4g}" for key, name in
                 (("loss", "loss"), ("cos", "cos"), ("top1", "top1")) if isinstance(row.get(f"{prefix}_{key}"), float)]
        return f"{prefix} " + " ".join(parts) if parts else ""
    pieces = [p for p in (pick("train"), pick("val")) if p]
    return f"epoch {row['epoch']}: " + " | ".join(pieces) + f" | {row.get('seconds', 0.0):.1f} s" + \
        (f"  * best {monitor}" if best else "")


@dataclass
class _Data:
    """The training folder, the validation source and which samples each side uses."""

    train_dir: Path
    store: HiddenStore
    val_store: HiddenStore
    train_ids: set[str]
    val_ids: set[str] | None  # None: every sample of val_store (a --val_dir folder)
    val_source: str

    @property
    def config(self) -> dict[str, Any]:
        return self.store.config


def open_data(args: argparse.Namespace) -> _Data:
    """Open ``--train_dir`` (and ``--val_dir``), check the layers and splits, pick the held-out samples."""
    from feature_alignment.hidden_store import HiddenStore

    train_dir = Path(args.train_dir) if args.train_dir else find_with_legacy(
        DEFAULT_TRAIN_DIR, LEGACY_TRAIN_DIR, "the train split's hidden states")
    store = HiddenStore.open(train_dir)
    if not store.complete:
        log.warning("%s: extraction not complete (%d samples so far); training on what is there", train_dir,
                    store.num_samples)
    cfg = store.config
    for name, layer in (("--input_layer", args.input_layer), ("--target_layer", args.target_layer)):
        if layer not in cfg["layers"]:
            raise SystemExit(f"{name} {layer} was not extracted (layers {cfg['layers']} in {train_dir})")
    if cfg.get("split") == "test":
        raise SystemExit(f"{train_dir} holds the test split: train on a train split")
    all_ids = store.sample_ids()
    if args.val_dir:
        val_store = HiddenStore.open(args.val_dir)
        if val_store.config.get("split") == "test":
            raise SystemExit(f"--val_dir {args.val_dir} holds the test split; validate on held-out train samples "
                             "(drop --val_dir) or another split. The test split is only for --test_dir.")
        return _Data(train_dir, store, val_store, set(all_ids), None, f"folder {args.val_dir}")
    val_ids = held_out_ids(all_ids, args.val_fraction, args.seed, args.val_by)
    if not val_ids:
        log.warning("no validation samples (fraction %s, %d samples)", args.val_fraction, len(all_ids))
    return _Data(train_dir, store, store, set(all_ids) - val_ids, val_ids,
                 f"{len(val_ids)} held out of train by {args.val_by}, fraction {args.val_fraction}")


@dataclass
class _Setup:
    """What every pass needs besides the adapter: loss weights, target head, checkpoint metadata."""

    pass_kw: dict[str, Any]  # run_pass keywords shared by training, validation and test
    meta: dict[str, Any]  # stored in every checkpoint
    vocab: int


def build_setup(args: argparse.Namespace, data: _Data, device: torch.device) -> _Setup:
    """The target LM head (when it applies), loss weights and the checkpoint metadata."""
    cfg = data.config
    lm_head, head_meta = _lm_head(data.store, device)
    if lm_head is not None and args.target_layer not in (-1, cfg.get("target_num_layers")):
        log.warning("--target_layer %d does not feed the LM head: token loss and metrics are off", args.target_layer)
        lm_head = None
    vocab_limit = head_meta.get("shared_vocab_size", cfg.get("shared_vocab_size"))
    weights = {"mse": args.mse_weight, "cos": args.cos_weight, "token": args.token_weight if lm_head is not None else 0.0,
               "next": args.next_weight}
    vocab = int(lm_head.shape[0]) if lm_head is not None else int(cfg.get("target_vocab_size") or 0)
    meta = {"input_layer": args.input_layer, "target_layer": args.target_layer,
            "eventgpt_path": cfg.get("eventgpt_path"), "videollava_path": cfg.get("videollava_path"),
            "shared_vocab_size": vocab_limit, "target_vocab_size": vocab, "train_dir": str(data.train_dir),
            "draft_hidden_size": cfg["draft_hidden_size"], "target_hidden_size": cfg["target_hidden_size"]}
    pass_kw = dict(batch_size=args.batch_size, input_layer=args.input_layer, target_layer=args.target_layer,
                   lm_head=lm_head, vocab_limit=vocab_limit, weights=weights, device=device)
    return _Setup(pass_kw, meta, vocab)


def resume_state(args: argparse.Namespace, out: Path, run_args: dict[str, Any], adapter: BaseAdapter,
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A fresh training state, or the saved one (weights and optimizer loaded) when resuming ``out``."""
    from common.drafters.hidden_adapter import load_any_adapter

    state = {"epoch": 0, "best_value": None, "best_epoch": None, "bad_epochs": 0, "history": [], "finished": False,
             "stop_reason": None}
    if not (args.resume and (out / STATE_FILE).is_file() and (out / "last.safetensors").is_file()):
        return state
    saved = read_json(out / STATE_FILE)
    diff = [k for k in RESUME_KEYS if saved.get("args", {}).get(k) != run_args.get(k)]
    if diff:
        raise SystemExit(f"{out}: a run with other settings is there ({', '.join(diff)} differ); use another "
                         "--output_dir or --no_resume")
    state.update(saved["state"])
    if state["finished"] and state.get("stop_reason") == "max epochs" and args.epochs > state["epoch"]:
        state.update(finished=False, stop_reason=None)  # asked for more epochs: continue
    adapter.load_state_dict(load_any_adapter(out / "last.safetensors").state_dict())
    if (out / "last_optimizer.safetensors").is_file():
        load_optimizer(optimizer, out / "last_optimizer.safetensors")
    log.info("resuming %s after epoch %d", out, state["epoch"])
    return state


@dataclass
class _Training:
    """One run's moving parts: the (possibly DDP-wrapped) adapter, its optimizer and where it saves."""

    args: argparse.Namespace
    accelerator: Any
    adapter: Any  # what trains (DDP wraps it under a launcher)
    bare: BaseAdapter  # what checkpoints save
    optimizer: torch.optim.Optimizer
    data: _Data
    setup: _Setup
    out: Path
    run_args: dict[str, Any]

    def save_state(self, state: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            atomic_write_json(self.out / STATE_FILE, {"args": self.run_args, "state": state})


def run_epoch(t: _Training, epoch: int) -> dict[str, Any]:
    """Train one epoch, validate, and return the history row."""
    import numpy as np
    import torch

    args, data = t.args, t.data
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, epoch])
    train_stats = run_pass(t.adapter, data.store, data.train_ids, optimizer=t.optimizer, grad_clip=args.grad_clip,
                           rng=rng, desc=f"epoch {epoch} train", accelerator=t.accelerator, **t.setup.pass_kw)
    val_stats: dict[str, Any] = {}
    if data.val_ids is None or data.val_ids:
        with torch.no_grad():
            val_stats = run_pass(t.bare, data.val_store, data.val_ids, desc=f"epoch {epoch} val",
                                 accelerator=t.accelerator, **t.setup.pass_kw)
    return {"epoch": epoch, **{k: v for k, v in train_stats.items() if k != "positions"},
            **{k: v for k, v in val_stats.items() if k != "positions"},
            "train_positions": train_stats["positions"], "val_positions": val_stats.get("positions", 0),
            "seconds": time.perf_counter() - start}


def train_epochs(t: _Training, state: dict[str, Any]) -> None:
    """Epochs until ``--epochs`` or early stopping; checkpoints and state written after each (main process)."""
    from common.drafters.hidden_adapter import save_adapter

    args, main_process = t.args, t.accelerator.is_main_process
    history: list[dict[str, Any]] = state["history"]
    epoch = state["epoch"]
    while not state["finished"] and epoch < args.epochs:
        epoch += 1
        row = run_epoch(t, epoch)
        history.append(row)
        validated = t.data.val_ids is None or bool(t.data.val_ids)  # run_epoch validated
        monitor_value = row.get(args.monitor if validated else "train_loss")
        epoch_meta = {**t.setup.meta, "epoch": epoch, "metrics": to_jsonable(row)}
        if _better(monitor_value, state["best_value"], args.monitor if validated else "val_loss"):
            state.update(best_value=monitor_value, best_epoch=epoch, bad_epochs=0)
            if main_process:
                save_adapter(t.bare, t.out / "best.safetensors", epoch_meta)
        else:
            state["bad_epochs"] += 1
        if args.early_stopping > 0 and state["bad_epochs"] >= args.early_stopping:
            state.update(finished=True, stop_reason=f"early stopping ({args.early_stopping} epochs without a better "
                                                    f"{args.monitor})")
        elif epoch >= args.epochs:
            state.update(finished=True, stop_reason="max epochs")
        state["epoch"] = epoch
        if main_process:
            save_adapter(t.bare, t.out / "last.safetensors", epoch_meta)
            save_optimizer(t.optimizer, t.out / "last_optimizer.safetensors")
            atomic_write_json(t.out / "history.json", history)
        t.save_state(state)
        log.info("%s", epoch_line(row, args.monitor if validated else "train_loss", state["best_epoch"] == epoch))
    if not state["finished"]:
        state.update(finished=True, stop_reason=state.get("stop_reason") or "max epochs")
        t.save_state(state)


def summarize(t: _Training, state: dict[str, Any]) -> dict[str, Any]:
    """The run's statistics (the test split evaluated once with the best checkpoint)."""
    from common.drafters.hidden_adapter import load_any_adapter
    from feature_alignment.hidden_store import HiddenStore

    args, data, out = t.args, t.data, t.out
    history = state["history"]
    best_row = next((h for h in history if h["epoch"] == state["best_epoch"]), None)
    test_metrics = None
    if args.test_dir and (out / "best.safetensors").is_file():
        best = load_any_adapter(out / "best.safetensors", t.setup.pass_kw["device"])
        test_metrics = evaluate(best, HiddenStore.open(args.test_dir), None, **t.setup.pass_kw)
    return {
        "output_dir": str(out), "adapter_level": args.adapter_level, "adapter_config": t.bare.config.to_dict(),
        "num_parameters": t.bare.num_parameters(), "num_processes": t.accelerator.num_processes,
        "input_layer": args.input_layer, "target_layer": args.target_layer,
        "train_samples": len(data.train_ids),
        "val_samples": len(data.val_ids) if data.val_ids is not None else data.val_store.num_samples,
        "val_source": data.val_source, "num_chunks": len(data.store.chunks), "epochs_run": state["epoch"],
        "stop_reason": state["stop_reason"], "monitor": args.monitor, "best_epoch": state["best_epoch"],
        "best": best_row, "test": test_metrics, "checkpoint": str(out / "best.safetensors"),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    from common.distributed import make_accelerator
    from common.drafters.hidden_adapter import create_adapter

    set_seed(args.seed)
    accelerator = make_accelerator(args.device)
    main_process = accelerator.is_main_process
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
    out = run_folder(args, accelerator)
    data = open_data(args)
    setup = build_setup(args, data, device)
    cfg = data.config
    adapter = create_adapter(args.adapter_level, cfg["draft_hidden_size"], cfg["target_hidden_size"],
                             bottleneck=args.bottleneck, num_layers=args.num_layers, num_heads=args.num_heads,
                             ffn_dim=args.ffn_dim, d_model=args.d_model, dropout=args.dropout,
                             max_positions=args.max_positions, vocab_size=setup.vocab).to(device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    run_args["train_dir"] = str(data.train_dir)
    if main_process:
        atomic_write_json(out / "config.json", {"args": run_args,
                                                "argv": list(argv) if argv is not None else sys.argv[1:],
                                                "adapter_config": adapter.config.to_dict(), "meta": setup.meta,
                                                "extraction": cfg, "device": str(device),
                                                "num_processes": accelerator.num_processes})
    state = resume_state(args, out, run_args, adapter, optimizer)
    model, optimizer = accelerator.prepare(adapter, optimizer)  # DDP under a launcher; as-is in one process
    t = _Training(args, accelerator, model, accelerator.unwrap_model(model), optimizer, data, setup, out, run_args)
    train_epochs(t, state)
    accelerator.wait_for_everyone()  # best.safetensors is written before anyone reads it
    summary = summarize(t, state)
    if main_process:
        atomic_write_json(out / "results.json", {"statistics": summary, "history": state["history"]})
        atomic_write_text(out / "RESULTS.md", results_markdown(summary, state["history"]))
        if state["history"]:
            plot_history(state["history"], out / "training_curves.png", f"L{args.adapter_level} hidden adapter")
        RunFolder(out).mark_done()
        update_index(results_root_of(out))
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return summary


def _cli(argv: Sequence[str]) -> None:
    result = main(argv)
    best = result.get("best") or {}
    print(json.dumps(to_jsonable({"output_dir": result["output_dir"], "best_epoch": result["best_epoch"],
                                  "val_cos": best.get("val_cos"), "val_acc@0.90": best.get("val_acc@0.90"),
                                  "val_top1": best.get("val_top1")}), indent=2))


if __name__ == "__main__":
    run_cli(_cli)
