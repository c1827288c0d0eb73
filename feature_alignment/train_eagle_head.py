"""Train the EAGLE-style draft head on Video-LLaVA's own extracted features.

    python -m feature_alignment.train_eagle_head --train_dir data/feature_alignment/hidden/train \\
        --output_dir results/feature_alignment/eagle_head [--val_dir DIR --epochs 20 --lr 3e-4 --batch_size 16 \\
        --feature_layer -1 --videollava_path P --token_weight 0.1 --early_stopping 5]

Data: an extraction of ``feature_alignment.extract_hidden_states`` (the target's greedy answers,
teacher-forced; row t of a sample is the target's state just before its answer token t). Only
the target's layer ``--feature_layer`` (``videollava.<layer>``), ``target_ids`` and ``offsets``
are read, one chunk at a time. Per sample of length L the head reads ``(f_t, x_t)`` for
t = 0..L-2 and predicts ``f_{t+1}``; the target's frozen LM head on the prediction must give
``x_{t+1}``.

Loss = smooth L1 (feature regression) + ``--token_weight`` x cross-entropy of the LM-head logits
against the next target token (ids at or above the target's base vocabulary are masked, as
the drafter masks them). Per epoch: train/val losses and the validation top-1/top-5 of the
drafted next token (teacher-forced features, i.e. the first draft token of every step).

The target's LM head comes from the extraction (``lm_head.safetensors``) or the checkpoint,
its embedding table from the checkpoint (``--videollava_path``, default: the one the
extraction used); neither is stored in the head's checkpoint. Validation: ``--val_dir`` or a
hashed ``--val_fraction`` of the training samples; test splits are refused. Outputs in
``--output_dir``: ``best/`` and ``last/`` (config.json + model.safetensors: the head only),
config.json (run args), history.json, results.json, RESULTS.md, training_curves.png;
a rerun resumes from ``last/`` (``--no_resume`` starts over).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from common.cli import resolve_device, set_seed
from common.drafters.eagle_head import (
    EagleHead,
    head_config_from_checkpoint,
    load_eagle_head,
    read_target_embeddings,
    save_eagle_head,
)
from common.plots import plot_training_curves
from common.results import RunFolder, atomic_write_json, atomic_write_text, markdown_table, read_json
from feature_alignment.hidden_store import HiddenStore, layer_key, load_lm_head

log = logging.getLogger(__name__)
STATE_FILE = "train_state.json"
RESUME_KEYS = ("train_dir", "val_dir", "feature_layer", "lr", "batch_size", "num_heads", "intermediate_size",
               "token_weight", "feature_weight", "val_fraction", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feature_alignment.train_eagle_head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train_dir", required=True, help="extraction folder of a train split (hidden_store format)")
    g.add_argument("--val_dir", default=None, help="validation extraction (never a test split). Default: hold out "
                                                   "--val_fraction of the training samples")
    g.add_argument("--val_fraction", type=float, default=0.1, help="held-out share without --val_dir (default 0.1)")
    g.add_argument("--feature_layer", type=int, default=-1,
                   help="target layer the head reads and predicts (-1: final normed state, default; -2: the one below)")
    g.add_argument("--videollava_path", default=None,
                   help="target checkpoint for the embedding table (and LM head if the extraction lacks it). "
                        "Default: the extraction's videollava_path")
    g = p.add_argument_group("head")
    g.add_argument("--num_heads", type=int, default=None, help="attention heads (default: the target's)")
    g.add_argument("--intermediate_size", type=int, default=None, help="MLP width (default: the target's)")
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", required=True, help="folder for best/, last/, history and RESULTS.md")
    g.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--batch_size", type=int, default=16, help="sequences (answers) per step (default 16)")
    g.add_argument("--feature_weight", type=float, default=1.0, help="weight of the smooth-L1 feature loss (default 1)")
    g.add_argument("--token_weight", type=float, default=0.1, help="weight of the token cross-entropy (default 0.1)")
    g.add_argument("--feature_noise", type=float, default=0.0,
                   help="uniform noise amplitude added to input features in training (EAGLE uses 0.1-0.2; default 0)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    g.add_argument("--early_stopping", type=int, default=0, help="stop after N epochs without a better top-1 (0: off)")
    g.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--no_resume", dest="resume", action="store_false", default=True,
                   help="start over even if OUTPUT_DIR/last exists")
    return p


# ----------------------------------------------------------------------------- data

def _hash(text: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{text}".encode())


def held_out(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A deterministic held-out subset of sample ids (smallest hashes), at least one when possible."""
    if fraction <= 0 or len(ids) < 2:
        return set()
    ranked = sorted(set(ids), key=lambda s: (_hash(s, seed), s))
    n = min(len(ranked) - 1, max(1, round(fraction * len(ranked))))
    return set(ranked[:n])


def _samples_of_chunk(ref, layer: int, keep) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(id, features (L, H) fp16, target ids (L,)) of one chunk's samples for which ``keep(id)``."""
    with safe_open(str(ref.path), framework="pt") as f:
        name = layer_key("videollava", layer)
        if name not in set(f.keys()):
            stored = sorted(k for k in f.keys() if k.startswith("videollava."))
            raise SystemExit(f"{ref.path}: no target layer {layer} (stored: {stored}); pass --feature_layer with a "
                             "stored one or extract it (--layers)")
        feats, ids, offsets = f.get_tensor(name), f.get_tensor("target_ids"), f.get_tensor("offsets")
    out = []
    for i, sid in enumerate(ref.sample_ids):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b - a >= 2 and keep(sid):
            out.append((sid, feats[a:b], ids[a:b]))
    return out


def iter_batches(store: HiddenStore, layer: int, batch_size: int, keep, rng: np.random.Generator | None,
                 ) -> Iterator[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Batches of samples, one chunk in memory at a time (shuffled chunks and samples when ``rng``)."""
    order = list(range(len(store.chunks)))
    if rng is not None:
        rng.shuffle(order)
    for k in order:
        samples = _samples_of_chunk(store.chunks[k], layer, keep)
        if rng is not None:
            rng.shuffle(samples)
        for i in range(0, len(samples), batch_size):
            yield samples[i:i + batch_size]


def collate(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) inputs f_t, x_t and targets f_{t+1}, x_{t+1} with a mask."""
    t = max(int(f.shape[0]) - 1 for _, f, _ in batch)
    h = int(batch[0][1].shape[1])
    feats = torch.zeros((len(batch), t, h))
    nxt = torch.zeros((len(batch), t, h))
    tok = torch.zeros((len(batch), t), dtype=torch.long)
    tok_next = torch.zeros((len(batch), t), dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.bool)
    for i, (_, f, ids) in enumerate(batch):
        n = int(f.shape[0]) - 1
        feats[i, :n], nxt[i, :n] = f[:-1].float(), f[1:].float()
        tok[i, :n], tok_next[i, :n] = ids[:-1], ids[1:]
        mask[i, :n] = True
    return {k: v.to(device) for k, v in dict(feats=feats, next=nxt, tok=tok, tok_next=tok_next, mask=mask).items()}


# ----------------------------------------------------------------------------- loss and metrics

def batch_loss(head: EagleHead, b: dict[str, torch.Tensor], args, noise: float = 0.0,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch and its sums (positions, feature loss, CE, top-1, top-5)."""
    feats = b["feats"]
    if noise > 0:
        feats = feats + (torch.rand_like(feats) * 2 - 1) * noise
    pred = head(feats, head.embed(b["tok"]))
    mask = b["mask"]
    pred_m, target_m = pred[mask], b["next"][mask]
    feat_loss = F.smooth_l1_loss(pred_m.float(), target_m, reduction="none").mean(-1)
    logits = head.logits(pred_m)
    labels = b["tok_next"][mask]
    valid = torch.isfinite(logits.gather(1, labels.clamp_max(logits.shape[1] - 1)[:, None]))[:, 0]
    valid &= labels < logits.shape[1]
    ce = F.cross_entropy(logits[valid], labels[valid], reduction="sum") if bool(valid.any()) else logits.sum() * 0
    n = int(mask.sum())
    loss = args.feature_weight * feat_loss.mean() + args.token_weight * ce / max(int(valid.sum()), 1)
    with torch.no_grad():
        top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        sums = {"positions": n, "feature_loss": float(feat_loss.sum()), "ce": float(ce),
                "ce_positions": int(valid.sum()), "top1": int((top5[:, 0] == labels).sum()),
                "top5": int((top5 == labels[:, None]).any(-1).sum()),
                "cosine": float(F.cosine_similarity(pred_m.float(), target_m, dim=-1).sum())}
    return loss, sums


def _merge(total: dict[str, float], sums: dict[str, float]) -> None:
    for k, v in sums.items():
        total[k] = total.get(k, 0) + v


def _finish(total: dict[str, float], prefix: str, args) -> dict[str, float | None]:
    n, m = total.get("positions", 0), total.get("ce_positions", 0)
    if not n:
        return {f"{prefix}_positions": 0}
    feat, ce = total["feature_loss"] / n, (total["ce"] / m if m else 0.0)
    return {f"{prefix}_loss": args.feature_weight * feat + args.token_weight * ce, f"{prefix}_feature_loss": feat,
            f"{prefix}_ce": ce, f"{prefix}_top1": total["top1"] / n, f"{prefix}_top5": total["top5"] / n,
            f"{prefix}_cosine": total["cosine"] / n, f"{prefix}_positions": n}


@torch.no_grad()
def evaluate(head: EagleHead, store: HiddenStore, layer: int, keep, args, device) -> dict[str, float | None]:
    head.eval()
    total: dict[str, float] = {}
    for batch in iter_batches(store, layer, args.batch_size, keep, None):
        _, sums = batch_loss(head, collate(batch, device), args)
        _merge(total, sums)
    return _finish(total, "val", args)


# ----------------------------------------------------------------------------- target pieces

def target_pieces(store: HiddenStore, videollava_path: str | None, device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(LM head (V, H), embeddings (V, H), base vocab limit, checkpoint path) as float32 on ``device``."""
    cfg = store.config
    ckpt = videollava_path or cfg.get("videollava_path")
    if not ckpt or not Path(ckpt).is_dir():
        raise SystemExit(f"target checkpoint {ckpt!r} not found: pass --videollava_path (needed for the target's "
                         "embedding table)")
    head_path = store.lm_head_path()
    limit = None
    if head_path is not None:
        lm_head, meta = load_lm_head(head_path)
        limit = meta.get("base_vocab_size")
    else:
        from safetensors import safe_open as _open

        lm_head = None
        for f in sorted(Path(ckpt).glob("*.safetensors")):
            with _open(str(f), framework="pt") as st:
                key = next((k for k in st.keys() if k.endswith("lm_head.weight")), None)
                if key:
                    lm_head = st.get_tensor(key)
                    break
        if lm_head is None:
            raise SystemExit(f"{ckpt}: no lm_head.weight and the extraction saved none")
    embed = read_target_embeddings(ckpt)
    if embed.shape != lm_head.shape:
        raise SystemExit(f"embedding table {tuple(embed.shape)} and LM head {tuple(lm_head.shape)} differ: "
                         f"{ckpt} is not the checkpoint the features were extracted with")
    limit = int(limit or cfg.get("target_base_vocab_size") or lm_head.shape[0])
    return lm_head.float().to(device), embed.float().to(device), limit, str(ckpt)


# ----------------------------------------------------------------------------- main

def render_markdown(history: list[dict[str, Any]], best: dict[str, Any] | None, argv: list[str], head_cfg) -> str:
    lines = ["# EAGLE head training", "", f"Command: `python -m feature_alignment.train_eagle_head {' '.join(argv)}`", "",
             f"Head: one decoder layer, hidden {head_cfg.hidden_size}, heads {head_cfg.num_heads}, MLP "
             f"{head_cfg.intermediate_size}, feature layer {head_cfg.feature_layer}.", ""]
    if best:
        lines += [f"Best epoch {best['epoch']}: validation top-1 {best.get('val_top1', 0):.3f}, top-5 "
                  f"{best.get('val_top5', 0):.3f} (drafted next token from the teacher-forced feature).", ""]
    cols = ["epoch", "train_loss", "train_top1", "val_loss", "val_feature_loss", "val_ce", "val_top1", "val_top5",
            "val_cosine", "seconds"]
    lines += [markdown_table(history, cols, floatfmt=".4f"), ""]
    return "\n".join(lines)


def _check_split(store: HiddenStore, flag: str, path: str) -> None:
    if store.config.get("split") == "test":
        raise SystemExit(f"{flag} {path} holds the test split: train and validate on train data only")


def start_or_resume(args: argparse.Namespace, out: Path, run_args: dict[str, Any], head_cfg: Any,
                    ) -> tuple[EagleHead, torch.optim.Optimizer, dict[str, Any]]:
    """A new head and optimizer, or the ones of ``out/last`` with the saved state (history, epoch, best, steps)."""
    fresh: dict[str, Any] = {"history": [], "epoch": 0, "best": None, "steps": 0}
    state_file = out / STATE_FILE
    if not (args.resume and state_file.is_file() and (out / "last").is_dir()):
        head = EagleHead(head_cfg)
        return head, torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay), fresh
    saved = read_json(state_file)
    diff = [k for k in RESUME_KEYS if saved.get("args", {}).get(k) != run_args[k]]
    if diff:
        raise SystemExit(f"{out}: made with other settings ({', '.join(diff)}); use another --output_dir or "
                         "--no_resume")
    head = load_eagle_head(out / "last", device="cpu", dtype=torch.float32)
    head.config.extra = head_cfg.extra
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if (out / "last" / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(out / "last" / "optimizer.pt", weights_only=True))
    log.info("resuming %s at epoch %d", out, saved["epoch"])
    return head, optimizer, saved


def train_epoch(head: EagleHead, optimizer: torch.optim.Optimizer, store: HiddenStore, keep, args: argparse.Namespace,
                device: torch.device, rng: np.random.Generator, steps: int) -> tuple[dict[str, float], int]:
    """One pass over the training samples (stops at ``--max_steps``); (metric sums, optimizer steps so far)."""
    head.train()
    total: dict[str, float] = {}
    for batch in iter_batches(store, args.feature_layer, args.batch_size, keep, rng):
        loss, sums = batch_loss(head, collate(batch, device), args, noise=args.feature_noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        _merge(total, sums)
        steps += 1
        if args.max_steps and steps >= args.max_steps:
            break
    return total, steps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_seed(args.seed)
    device = resolve_device(args.device)
    out = Path(args.output_dir)
    train_store = HiddenStore.open(args.train_dir)
    _check_split(train_store, "--train_dir", args.train_dir)
    val_store, val_ids = train_store, set()
    if args.val_dir:
        val_store = HiddenStore.open(args.val_dir)
        _check_split(val_store, "--val_dir", args.val_dir)
    else:
        val_ids = held_out(train_store.sample_ids(), args.val_fraction, args.seed)
    def train_keep(sid: str) -> bool:
        return sid not in val_ids

    def val_keep(sid: str) -> bool:
        return bool(args.val_dir) or sid in val_ids

    lm_head, embed, limit, ckpt = target_pieces(train_store, args.videollava_path, device)
    hidden = int(lm_head.shape[1])
    head_cfg = head_config_from_checkpoint(ckpt, hidden, args.feature_layer, int(lm_head.shape[0]),
                                           args.num_heads, args.intermediate_size)
    head_cfg.extra = {"train_dir": str(Path(args.train_dir).resolve()), "videollava_path": str(Path(ckpt).resolve()),
                      "val_dir": args.val_dir, "val_samples": len(val_ids) if not args.val_dir else None}

    state_file = out / STATE_FILE
    run_args = {k: getattr(args, k) for k in RESUME_KEYS}
    head, optimizer, saved = start_or_resume(args, out, run_args, head_cfg)
    history, start_epoch, best, steps = saved["history"], saved["epoch"], saved.get("best"), saved.get("steps", 0)
    head = head.to(device)
    for group in optimizer.state.values():
        for k, v in list(group.items()):
            if isinstance(v, torch.Tensor):
                group[k] = v.to(device)
    head.bind(lm_head=lm_head, embed_tokens=embed, vocab_limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    RunFolder(out).write_config(args, argv)
    log.info("EAGLE head: %d parameters; %d train samples, %s validation", head.num_parameters(),
             train_store.num_samples - len(val_ids), args.val_dir or f"{len(val_ids)} held out")

    rng = np.random.default_rng(args.seed + start_epoch)
    stale = 0
    stopped = "epochs"
    for epoch in range(start_epoch + 1, args.epochs + 1):
        t0 = time.perf_counter()
        total, steps = train_epoch(head, optimizer, train_store, train_keep, args, device, rng, steps)
        row: dict[str, Any] = {"epoch": epoch, "steps": steps, **_finish(total, "train", args)}
        row.update(evaluate(head, val_store, args.feature_layer, val_keep, args, device))
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        score = (row.get("val_top1") or 0.0, -(row.get("val_loss") or 0.0))
        improved = best is None or score > (best.get("val_top1") or 0.0, -(best.get("val_loss") or 0.0))
        if improved:
            best, stale = dict(row), 0
            save_eagle_head(head, out / "best")
        else:
            stale += 1
        save_eagle_head(head, out / "last")
        torch.save(optimizer.state_dict(), out / "last" / "optimizer.pt")
        atomic_write_json(state_file, {"args": run_args, "epoch": epoch, "history": history, "best": best,
                                       "steps": steps})
        log.info("epoch %d: train loss %.4f top-1 %.3f | val loss %s top-1 %s top-5 %s", epoch,
                 row.get("train_loss") or 0.0, row.get("train_top1") or 0.0, _f(row.get("val_loss")),
                 _f(row.get("val_top1")), _f(row.get("val_top5")))
        if args.max_steps and steps >= args.max_steps:
            stopped = "max_steps"
            break
        if args.early_stopping and stale >= args.early_stopping:
            stopped = "early_stopping"
            break
    atomic_write_json(out / "history.json", history)
    results = {"best": best, "history": history, "checkpoint": str(out / "best"), "stopped": stopped,
               "head_config": head_cfg.to_dict(), "num_parameters": head.num_parameters(), "vocab_limit": limit}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", render_markdown(history, best, argv, head_cfg))
    if history:
        plot_training_curves(history, out / "training_curves.png",
                             [("loss", ["train_loss", "val_loss"]), ("next-token top-1", ["train_top1", "val_top1",
                                                                                          "val_top5"])],
                             title="EAGLE head")
    return results


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
