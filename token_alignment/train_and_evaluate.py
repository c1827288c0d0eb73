"""Train a TokenAdapter on extracted token pairs, select it on validation, report it on test, teacher forced AND live.

Examples:
    python -m token_alignment.train_and_evaluate --train_tokens data/token_alignment/train_10q.jsonl \\
        --test_tokens data/token_alignment/test_10q.jsonl --task_name tokens_10q
    python -m token_alignment.train_and_evaluate --train_tokens A.jsonl B.jsonl --val_tokens V.jsonl \\
        --test_tokens T.jsonl --task_name x --epochs 50 --early_stopping 8 --live_samples 50 --gamma 5 --star

Splits: training uses --train_tokens; the checkpoint (epoch) is selected on --val_tokens or, when
that is omitted, on a fixed share (--val_fraction) of the training CLIPS held out by a stable hash
of the clip id (all questions of a clip stay on one side). The test file is read only after
training has finished: it never influences selection.

Reports on test, teacher forced: the raw baselines (EventGPT's own answer token == target token at
the same index; EventGPT's greedy next token given the target prefix == target token, which is
what the raw EventGPT drafter proposes) and the adapter's top-1/top-5, plus the acceptance these
imply for the greedy speculative loop. Then LIVE (needs the models): speculative_generate on test
samples with the raw EventGPT drafter and with the adapter drafter, acceptance rate and mean
accepted length of each, and the lossless check: every live output must equal the target's own
greedy output.

Writes results/token_alignment/<task_name>_<YYYYMMDD_HHMMSS>/ (``--output_dir`` sets the base): checkpoint/ (config.json +
model.safetensors, the best epoch), config.json (run args), results.json, RESULTS.md,
training_curves.png, loss_curve.png, accuracy_curve.png, DONE. --star copies the run to
results/token_alignment/starred/ (the benchmarks' --use_token_adapter finds runs there too).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import add_common_args, resolve_device, run_cli, set_seed, shard
from common.lazy import no_grad
from common.locations import results_dir
from common.progress import progress
from common.results import RunFolder
from common.run_index import results_root_of, update_index
from token_alignment.pairs import clip_of, load_token_pairs, split_by_clip

if TYPE_CHECKING:  # heavy imports happen inside the functions, so --help prints fast
    import torch

    from common.drafters.token_adapter import (
        AdapterExample,
        TokenAdapter,
        TokenAdapterConfig,
    )
    from common.speculative import SpecResult

STAGE = "token_alignment"
TASK_ROOT = results_dir(STAGE)  # results/token_alignment (older versions wrote token_alignment/task)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m token_alignment.train_and_evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    g = p.add_argument_group("data")
    g.add_argument("--train_tokens", nargs="+", required=True, help="Token file(s) of the train split (shards ok).")
    g.add_argument("--val_tokens", nargs="+", default=None,
                   help="Token file(s) for model selection. Default: hold out --val_fraction of the train clips.")
    g.add_argument("--test_tokens", nargs="+", required=True, help="Token file(s) of the test split (report only).")
    g.add_argument("--val_fraction", type=float, default=0.1,
                   help="Share of train clips held out for validation when --val_tokens is omitted. Default: 0.1.")
    g.add_argument("--dataset_dir", type=str, default=None,
                   help="Clip dataset of the test records (for the live run). Default: the one the records name.")
    g.add_argument("--allow_pickle", action="store_true", help="Allow pickled .npy event files (trusted data only).")
    g = p.add_argument_group("output")
    g.add_argument("--task_name", type=str, default="token_adapter", help="Run name. Default: token_adapter.")
    g.add_argument("--output_dir", type=str, default=None,
                   help="Folder of the run folders. Default: results/token_alignment.")
    g.add_argument("--star", action="store_true", help="Also copy the finished run to <output_dir>/starred/.")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=50, help="Maximum epochs. Default: 50.")
    g.add_argument("--early_stopping", type=int, default=10,
                   help="Stop after this many epochs without a better validation top-1 (0: off). Default: 10.")
    g.add_argument("--batch_size", type=int, default=32, help="Sequences per step. Default: 32.")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate. Default: 1e-3.")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay. Default: 0.01.")
    g.add_argument("--d_model", type=int, default=256, help="Adapter width. Default: 256.")
    g.add_argument("--n_layers", type=int, default=4, help="Adapter layers. Default: 4.")
    g.add_argument("--n_heads", type=int, default=4, help="Attention heads. Default: 4.")
    g.add_argument("--dropout", type=float, default=0.1, help="Dropout. Default: 0.1.")
    g.add_argument("--no_draft_answer", action="store_true",
                   help="Do not feed the draft's free-running answer (then every step needs the draft model).")
    g.add_argument("--no_draft_next", action="store_true",
                   help="Do not feed the draft model's next-token prediction (then no draft forward per step).")
    g = p.add_argument_group("evaluation")
    g.add_argument("--gamma", type=int, default=5, help="Draft tokens per verify step. Default: 5.")
    g.add_argument("--live_samples", type=int, default=20,
                   help="Test samples decoded live with both models, evenly spaced over the test file "
                        "(0: skip the live run). Default: 20.")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="Live answer length. Default: the extraction's max_new_tokens.")
    add_common_args(p, models=True, data=False, output=False)
    return p


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------

def to_example(record: dict) -> AdapterExample:
    from common.drafters.token_adapter import AdapterExample

    return AdapterExample(list(record["egpt_token_ids"]), list(record["videollava_token_ids"]),
                          list(record["egpt_tf_token_ids"]))


def _config_from(records: Sequence[dict], args: argparse.Namespace) -> TokenAdapterConfig:
    from common.drafters.token_adapter import TokenAdapterConfig

    limit = min(int(r.get("vocab_limit") or min(r["egpt_base_vocab_size"], r["videollava_base_vocab_size"]))
                for r in records)
    max_new = max(int(r.get("max_new_tokens") or len(r["egpt_token_ids"])) for r in records)
    longest = max(max(len(r["egpt_token_ids"]), len(r["videollava_token_ids"])) for r in records)
    models = {key: records[0].get(key) for key in ("egpt_model", "videollava_model") if records[0].get(key)}
    return TokenAdapterConfig(
        extra={"trained_with": models},
        draft_vocab_size=max(int(r["egpt_vocab_size"]) for r in records),
        target_vocab_size=max(int(r["videollava_vocab_size"]) for r in records),
        vocab_limit=limit, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        dropout=args.dropout, max_draft_len=max(max_new, 1), max_positions=max(512, 2 * longest + 8),
        draft_answer_tokens=max_new, use_draft_answer=not args.no_draft_answer,
        use_draft_next=not args.no_draft_next,
    )


# ----------------------------------------------------------------------------------------
# Teacher-forced evaluation
# ----------------------------------------------------------------------------------------

@no_grad
def predict(adapter: TokenAdapter, records: Sequence[dict], batch_size: int = 64) -> dict[str, Any]:
    """Per record: top-5 ids at every target position, and the mean loss over all predictable positions."""
    import torch

    from common.drafters.token_adapter import IGNORE

    adapter.eval()
    tops: list[list[list[int]]] = []
    loss_sum, count = 0.0, 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = adapter.collate([to_example(r) for r in chunk])
        logits = adapter(batch)
        labels = batch["labels"].to(logits.device)
        valid = labels != IGNORE
        if bool(valid.any()):
            loss_sum += float(torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum"))
            count += int(valid.sum())
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        for j, r in enumerate(chunk):
            tops.append(top[j, : len(r["videollava_token_ids"])].tolist())
    return {"top5": tops, "loss": loss_sum / count if count else None}


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _simulated(hit_lists: Sequence[Sequence[bool]], gamma: int, max_new: Sequence[int]) -> dict[str, Any]:
    from common.drafters.token_adapter import simulate_live_acceptance
    from common.speculative import SpecResult, aggregate_metrics

    results = [SpecResult(tokens=[], iterations=simulate_live_acceptance(h, gamma, m)["iterations"])
               for h, m in zip(hit_lists, max_new)]
    agg = aggregate_metrics(results)
    return {"acceptance_rate": agg["acceptance_rate"], "mean_accepted_length": agg["mean_accepted_length"],
            "token_acceptance_probability": agg["token_acceptance_probability"]}


def teacher_forced_report(adapter: TokenAdapter, records: Sequence[dict], gamma: int,
                          batch_size: int = 64) -> dict[str, Any]:
    """Top-1/top-5 of the adapter and the raw baselines over all target positions, and the implied live numbers."""
    pred = predict(adapter, records, batch_size)
    total = top1 = top5 = pos_match = next_match = 0
    adapter_hits, raw_hits, max_new = [], [], []
    for r, tops in zip(records, pred["top5"]):
        target, draft, nxt = r["videollava_token_ids"], r["egpt_token_ids"], r["egpt_tf_token_ids"]
        a_hits = [bool(tops[j][0] == t) for j, t in enumerate(target)]
        e_hits = [bool(j < len(nxt) and nxt[j] == t) for j, t in enumerate(target)]
        total += len(target)
        top1 += sum(a_hits)
        top5 += sum(int(t in tops[j]) for j, t in enumerate(target))
        pos_match += sum(int(j < len(draft) and draft[j] == t) for j, t in enumerate(target))
        next_match += sum(e_hits)
        adapter_hits.append(a_hits)
        raw_hits.append(e_hits)
        max_new.append(int(r.get("max_new_tokens") or len(target)))
    return {
        "num_samples": len(records), "num_clips": len({clip_of(r) for r in records}), "num_positions": total,
        "loss": pred["loss"],
        "adapter_top1": _rate(top1, total), "adapter_top5": _rate(top5, total),
        "baseline_position_match": _rate(pos_match, total),
        "baseline_draft_next_match": _rate(next_match, total),
        "predicted_live_adapter": _simulated(adapter_hits, gamma, max_new),
        "predicted_live_raw": _simulated(raw_hits, gamma, max_new),
    }


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------

def _lr_schedule(opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """One epoch of linear warm-up, then cosine decay over all steps (stepped once per global step)."""
    import torch

    total = steps_per_epoch * epochs
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps_per_epoch)) * 0.5 * (1 + math.cos(math.pi * min(s, total)
                                                                                        / max(1, total))))


class _Selection:
    """Epoch-end bookkeeping of both training loops: history row, best checkpoint (main process), early stop."""

    def __init__(self, adapter: TokenAdapter, args: argparse.Namespace, checkpoint_dir: Path | None, log,
                 main: bool = True):
        self.adapter, self.args, self.checkpoint_dir, self.log, self.main = adapter, args, checkpoint_dir, log, main
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, float] | None = None
        self.best_epoch: int | None = None
        self.since_best = 0

    def end_epoch(self, epoch: int, loss_sum: float, n_tok: float, hit: float, val: dict, lr: float) -> bool:
        """Record the epoch; save on a better val top-1 (ties: lower loss); return True to stop early."""
        row = {"epoch": epoch, "train_loss": loss_sum / n_tok if n_tok else None,
               "train_top1": hit / n_tok if n_tok else None, "val_loss": val["loss"],
               "val_top1": val["adapter_top1"], "val_top5": val["adapter_top5"],
               "val_baseline_draft_next": val["baseline_draft_next_match"], "lr": lr}
        self.history.append(row)
        key = (row["val_top1"] or 0.0, -(row["val_loss"] if row["val_loss"] is not None else math.inf))
        improved = self.best is None or key > self.best
        if improved:
            self.best, self.best_epoch, self.since_best = key, epoch, 0
            if self.main and self.checkpoint_dir is not None:
                self.adapter.save_pretrained(self.checkpoint_dir, extra={
                    "best_epoch": epoch, "val_top1": row["val_top1"], "val_loss": row["val_loss"]})
        else:
            self.since_best += 1
        if self.main:
            self.log(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} top1 {row['train_top1']:.3f}  "
                     f"val loss {row['val_loss'] if row['val_loss'] is None else round(row['val_loss'], 4)} "
                     f"top1 {row['val_top1']:.3f} top5 {row['val_top5']:.3f}{'  *' if improved else ''}")
        stop = bool(self.args.early_stopping and self.since_best >= self.args.early_stopping)
        if stop and self.main:
            self.log(f"early stopping: no better validation top-1 for {self.since_best} epochs")
        return stop

    def result(self) -> dict[str, Any]:
        return {"history": self.history, "best_epoch": self.best_epoch, "epochs_run": len(self.history)}


def _train_step(model: Any, adapter: TokenAdapter, examples: list, batch_ids: list[int], accelerator: Any,
                opt: torch.optim.Optimizer) -> torch.Tensor:
    """One global batch: this rank's share, its loss sums over the whole batch's tokens; (loss, tokens, hits)."""
    import torch

    from common.drafters.token_adapter import IGNORE

    world, rank = accelerator.num_processes, accelerator.process_index
    mine = shard(batch_ids, world, rank)
    batch = adapter.collate([examples[j] for j in (mine or batch_ids[:1])])  # no share: a zero-weighted forward
    whole = batch if mine == batch_ids else adapter.collate([examples[j] for j in batch_ids])
    count = max(1, int((whole["labels"] != IGNORE).sum()))  # tokens of the global batch
    logits = model(batch)
    labels = batch["labels"].to(logits.device)
    valid = labels != IGNORE
    ce = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum") if bool(valid.any()) \
        else logits.sum() * 0.0
    loss = ce * (1.0 if mine else 0.0) / count
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss * world)  # DDP averages over ranks: undo the 1/world
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if not mine:
        return torch.zeros(3, dtype=torch.float64)
    return torch.tensor([float(ce.detach()), float(valid.sum()), float((logits.argmax(-1) == labels)[valid].sum())],
                        dtype=torch.float64)


def train(adapter: TokenAdapter, train_records: Sequence[dict], val_records: Sequence[dict],
          args: argparse.Namespace, checkpoint_dir: Path | None, log=print, accelerator: Any = None) -> dict[str, Any]:
    """Train; after every epoch evaluate on val and save the checkpoint when val top-1 improves (ties: lower loss).

    Only ``train_records`` and ``val_records`` are seen here: the test split cannot influence selection.
    One loop for one process and many (``accelerator``; None = a one-process CPU/device pass-through):
    every rank takes its contiguous share of each global batch and divides its loss sum by the
    global batch's tokens, so DDP's averaged gradients equal one process's update on the whole batch;
    token sums are reduced across ranks and only the main process saves (``checkpoint_dir``).
    """
    import torch

    from common.distributed import make_accelerator

    if accelerator is None:
        accelerator = make_accelerator(str(adapter.device))
    examples = [to_example(r) for r in train_records]
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = _lr_schedule(opt, max(1, math.ceil(len(examples) / args.batch_size)), args.epochs)  # not wrapped
    model, dopt = accelerator.prepare(adapter, opt)
    gen = torch.Generator().manual_seed(args.seed)
    selection = _Selection(adapter, args, checkpoint_dir, log, main=accelerator.is_main_process)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(examples), generator=gen).tolist()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, hits of this rank
        for i in range(0, len(order), args.batch_size):
            sums += _train_step(model, adapter, examples, order[i:i + args.batch_size], accelerator, dopt)
            sched.step()
        loss_sum, n_tok, hit = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
        val = teacher_forced_report(adapter, val_records, args.gamma)  # every rank: same weights, same selection
        if selection.end_epoch(epoch, loss_sum, n_tok, int(hit), val, sched.get_last_lr()[0]):
            break
    accelerator.wait_for_everyone()
    return selection.result()


# ----------------------------------------------------------------------------------------
# Live evaluation
# ----------------------------------------------------------------------------------------

def _live_sample(record: dict, args: argparse.Namespace, datasets: dict[tuple, dict]) -> Any:
    """The clip sample a token record was extracted from, read as the extraction read it (``event_source``)."""
    from common.data import DEFAULT_EVENT_SOURCE, ClipDataset

    key = (args.dataset_dir or record.get("dataset_dir"), record.get("split"), int(record.get("max_questions") or 1),
           record.get("event_source") or DEFAULT_EVENT_SOURCE)
    if key not in datasets:
        if key[0] is None:
            raise SystemExit("the test records name no dataset_dir: pass --dataset_dir for the live run")
        ds = ClipDataset(key[0], split=key[1], max_questions=key[2], allow_pickle=args.allow_pickle,
                         event_source=key[3])
        datasets[key] = {s.id: s for s in ds.samples}
    sample = datasets[key].get(str(record["id"]))
    if sample is None:
        raise SystemExit(f"sample {record['id']} not found in {key[0]} (split {key[1]}); pass the right --dataset_dir")
    return sample


def live_report(adapter: TokenAdapter, records: Sequence[dict], args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Speculative decoding on test samples: raw EventGPT drafter vs adapter drafter, both checked lossless."""
    from common.defaults import resolve_model_paths
    from common.drafters.token_adapter import SafeDraftModel, TokenAdapterDrafter
    from common.drafters.token_drafter import aligned_metrics
    from common.models.loader import load_vlm
    from common.speculative import (
        ModelDrafter,
        aggregate_metrics,
        autoregressive_generate,
        speculative_generate,
    )

    egpt_path, vllava_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    kwargs = {"allow_pickle": True} if args.allow_pickle else {}
    egpt = load_vlm("eventgpt", egpt_path, quant=args.quant, device=args.device, **kwargs)
    vllava = load_vlm("videollava", vllava_path, quant=args.quant, device=args.device)
    adapter = adapter.to(egpt.device).eval()
    limit = min(egpt.base_vocab_size, vllava.base_vocab_size, adapter.config.vocab_limit)
    datasets: dict[tuple, dict] = {}
    samples, pairs, raw_results, ada_results = [], [], [], []
    lossless_raw = lossless_ada = ref_same = answer_same = 0
    for r in progress(records, "live speculative decoding", "sample"):
        sample = _live_sample(r, args, datasets)
        max_new = int(args.max_new_tokens or r.get("max_new_tokens") or len(r["videollava_token_ids"]))
        vis_e, vis_v = egpt.encode(sample), vllava.encode(sample)
        ref = autoregressive_generate(vllava, vllava.prefill(vis_v, sample.question), max_new_tokens=max_new)
        raw_drafter = ModelDrafter(SafeDraftModel(egpt, limit), egpt.prefill(vis_e, sample.question),
                                   vocab_limit=limit, name="eventgpt")
        raw = speculative_generate(vllava, vllava.prefill(vis_v, sample.question), raw_drafter,
                                   max_new_tokens=max_new, gamma=args.gamma)
        drafter = TokenAdapterDrafter(adapter, draft_model=egpt, draft_state=egpt.prefill(vis_e, sample.question),
                                      vocab_limit=limit)
        ada = speculative_generate(vllava, vllava.prefill(vis_v, sample.question), drafter,
                                   max_new_tokens=max_new, gamma=args.gamma)
        annotated = drafter.annotate(ada)
        raw_results.append(raw)
        ada_results.append(ada)
        pairs.append((raw, annotated))
        ok_raw, ok_ada = raw.tokens == ref.tokens, ada.tokens == ref.tokens
        lossless_raw += ok_raw
        lossless_ada += ok_ada
        same_ref = ref.tokens == list(r["videollava_token_ids"]) if max_new == r.get("max_new_tokens") else None
        ref_same += bool(same_ref)
        same_answer = drafter.draft_answer == list(r["egpt_token_ids"][: len(drafter.draft_answer)])
        answer_same += same_answer
        samples.append({
            "id": r["id"], "split": r.get("split"), "query": r.get("question"), "event_data": r.get("event_data"),
            "video_data": r.get("video_data"), "egpt": r.get("egpt"), "egpt_token_ids": r["egpt_token_ids"],
            "videollava": vllava.decode_text(ref.tokens), "videollava_token_ids": ref.tokens,
            "videollava_time": ref.seconds, "reference_matches_extraction": same_ref,
            "draft_answer_matches_extraction": same_answer,
            "raw_lossless": ok_raw, "adapter_lossless": ok_ada,
            "raw_acceptance_rate": raw.acceptance_rate, "raw_mean_accepted_length": raw.mean_accepted_length,
            "adapter_acceptance_rate": ada.acceptance_rate, "adapter_mean_accepted_length": ada.mean_accepted_length,
            "adapter_top5_rate": annotated["top5_rate"],
            "raw_iterations": [list(it) for it in raw.iterations],
            "adapter_iterations": [list(it) for it in ada.iterations],
            "raw_seconds": raw.total_seconds, "adapter_seconds": ada.total_seconds,
        })
        if not (ok_raw and ok_ada):
            log(f"LOSSY OUTPUT on {r['id']}: raw {ok_raw}, adapter {ok_ada} (a bug: the output must be the target's)")
    n = len(records)

    def pooled(results: list[SpecResult]) -> dict[str, Any]:
        agg = aggregate_metrics(results)
        keys = ("acceptance_rate", "mean_accepted_length", "token_acceptance_probability", "per_position_acceptance",
                "accepted_length_histogram", "num_drafted", "num_accepted", "num_verify_steps", "total_seconds")
        return {k: agg[k] for k in keys}

    return {
        "num_samples": n, "gamma": args.gamma,
        "raw": {**pooled(raw_results), "lossless_rate": _rate(lossless_raw, n)},
        "adapter": {**pooled(ada_results), "lossless_rate": _rate(lossless_ada, n),
                    "top5_rate": aligned_metrics(pairs)["aligned_top5_rate_avg"]},
        "aligned_metrics": aligned_metrics(pairs),
        "reference_matches_extraction_rate": _rate(ref_same, n),
        "draft_answer_matches_extraction_rate": _rate(answer_same, n),
        "samples": samples,
    }


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------

def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def markdown(stats: dict[str, Any], args: argparse.Namespace, run: Path) -> str:
    tf, live = stats["test_teacher_forced"], stats.get("live")
    pl_raw, pl_ada = tf["predicted_live_raw"], tf["predicted_live_adapter"]
    d = stats["data"]
    lines = [
        f"# TokenAdapter: {run.name}",
        "",
        f"Train {d['train_samples']} samples / {d['train_clips']} clips; validation {d['val_samples']} / "
        f"{d['val_clips']} ({d['val_source']}); test {tf['num_samples']} / {tf['num_clips']} "
        f"({tf['num_positions']} target positions). Best epoch {stats['best_epoch']} of {stats['epochs_run']} "
        "(selected on validation top-1; the test file is read after training).",
        "",
        f"gamma = {args.gamma}. Acceptance rate = accepted / drafted (vLLM); mean accepted length = "
        "1 + accepted / verify steps. 'Predicted' = the greedy speculative loop replayed on the "
        "teacher-forced hits; it equals the live run whenever the live predictions equal the "
        "teacher-forced ones, which the adapter's inputs are designed to guarantee.",
        "",
        "## Teacher forced, whole test split",
        "",
        "| drafter | top-1 | top-5 | predicted acceptance | predicted mean acc. len |",
        "|---|---|---|---|---|",
        f"| EventGPT's own answer, same index (D_j == t_j) | {_fmt(tf['baseline_position_match'])} | - | - | - |",
        f"| raw EventGPT drafter (its next token given the target prefix) | {_fmt(tf['baseline_draft_next_match'])} "
        f"| - | {_fmt(pl_raw['acceptance_rate'])} | {_fmt(pl_raw['mean_accepted_length'], False)} |",
        f"| TokenAdapter | {_fmt(tf['adapter_top1'])} | {_fmt(tf['adapter_top5'])} | "
        f"{_fmt(pl_ada['acceptance_rate'])} | {_fmt(pl_ada['mean_accepted_length'], False)} |",
        "",
    ]
    if live:
        lr, la, sub = live["raw"], live["adapter"], live["teacher_forced_same_samples"]
        am = live["aligned_metrics"]
        lines += [
            f"## LIVE: speculative_generate on {live['num_samples']} test samples (evenly spaced)",
            "",
            "| drafter | TF top-1 (same samples) | predicted acceptance | LIVE acceptance | predicted mean acc. len "
            "| LIVE mean acc. len | LIVE lossless |",
            "|---|---|---|---|---|---|---|",
            f"| raw EventGPT drafter | {_fmt(sub['baseline_draft_next_match'])} | "
            f"{_fmt(sub['predicted_live_raw']['acceptance_rate'])} | {_fmt(lr['acceptance_rate'])} | "
            f"{_fmt(sub['predicted_live_raw']['mean_accepted_length'], False)} | "
            f"{_fmt(lr['mean_accepted_length'], False)} | {_fmt(lr['lossless_rate'])} |",
            f"| TokenAdapter | {_fmt(sub['adapter_top1'])} | {_fmt(sub['predicted_live_adapter']['acceptance_rate'])} | "
            f"{_fmt(la['acceptance_rate'])} | {_fmt(sub['predicted_live_adapter']['mean_accepted_length'], False)} | "
            f"{_fmt(la['mean_accepted_length'], False)} | {_fmt(la['lossless_rate'])} |",
            "",
            f"Adapter live top-5 {_fmt(la.get('top5_rate'))}; per-sample acceptance "
            f"{_fmt(am['aligned_acceptance_rate_avg'])} ± {_fmt(am['aligned_acceptance_rate_std'])} "
            f"(raw {_fmt(am['raw_acceptance_rate_avg'])}); per-position acceptance (adapter) "
            f"{[round(x, 3) for x in la.get('per_position_acceptance', [])]}. The target's live greedy output "
            f"equals the extracted answer in {_fmt(live['reference_matches_extraction_rate'])} of samples.",
            "",
        ]
    else:
        lines += ["Live run skipped (--live_samples 0).", ""]
    lines += ["Validation (selection split) at the best epoch: top-1 "
              f"{_fmt(stats['val_teacher_forced']['adapter_top1'])}, raw next-token "
              f"{_fmt(stats['val_teacher_forced']['baseline_draft_next_match'])}.", ""]
    return "\n".join(lines)


def evenly_spaced(records: Sequence[dict], n: int) -> list[dict]:
    """``n`` records spread over the whole list (deterministic), so the live subset covers many clips."""
    if n >= len(records):
        return list(records)
    return [records[(i * len(records)) // n] for i in range(n)]


def _plots(history: list[dict], run: Path) -> None:
    from common.plots import plot_training_curves

    plot_training_curves(history, run / "training_curves.png",
                         [("loss", ["train_loss", "val_loss"]),
                          ("accuracy", ["train_top1", "val_top1", "val_top5", "val_baseline_draft_next"])],
                         title="TokenAdapter training")
    plot_training_curves(history, run / "loss_curve.png", [("loss", ["train_loss", "val_loss"])])
    plot_training_curves(history, run / "accuracy_curve.png",
                         [("accuracy", ["train_top1", "val_top1", "val_top5", "val_baseline_draft_next"])])


def _pair_keys(records: Sequence[dict]) -> set[str]:
    return {json.dumps([r.get("egpt_model"), r.get("videollava_model")], sort_keys=True) for r in records}


def load_splits(args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """(train records, validation records, where validation comes from); warns on mixed pairs or shared clips."""
    train_records = load_token_pairs(args.train_tokens)
    if args.val_tokens:
        val_records, val_source = load_token_pairs(args.val_tokens), "--val_tokens"
    else:
        train_records, val_records = split_by_clip(train_records, args.val_fraction)
        val_source = f"{args.val_fraction:.0%} of train clips held out"
    if not train_records or not val_records:
        raise SystemExit("no complete training/validation records: finish the extraction first")
    pairs_used = _pair_keys(train_records + val_records)
    if len(pairs_used) > 1:
        warnings.warn(f"the training/validation records come from {len(pairs_used)} different model pairs",
                      stacklevel=1)
    overlap = {clip_of(r) for r in train_records} & {clip_of(r) for r in val_records}
    if overlap:
        warnings.warn(f"{len(overlap)} clips are in both train and validation", stacklevel=1)
    return list(train_records), list(val_records), val_source


def load_test(args: argparse.Namespace, seen: Sequence[dict]) -> tuple[list[dict], int]:
    """The test records (read only after selection) and how many of their clips the model has seen."""
    test_records = load_token_pairs(args.test_tokens)
    if _pair_keys(test_records) - _pair_keys(seen):
        warnings.warn("the test records come from another model pair than the training records", stacklevel=1)
    leaked = {clip_of(r) for r in test_records} & {clip_of(r) for r in seen}
    if leaked:
        warnings.warn(f"{len(leaked)} test clips also appear in train/validation: test numbers are optimistic",
                      stacklevel=1)
    return list(test_records), len(leaked)


def evaluate_best(best: TokenAdapter, args: argparse.Namespace, train_records: list[dict], val_records: list[dict],
                  val_source: str) -> tuple[dict[str, Any], list[dict]]:
    """Statistics of the selected checkpoint (validation, test teacher forced, live) and the live samples."""
    val_report = teacher_forced_report(best, val_records, args.gamma)
    test_records, leaked = load_test(args, train_records + val_records)  # the test split is read only now
    test_report = teacher_forced_report(best, test_records, args.gamma)
    live = None
    if args.live_samples > 0:
        subset = evenly_spaced(test_records, args.live_samples)
        live = live_report(best, subset, args)
        live["teacher_forced_same_samples"] = teacher_forced_report(best, subset, args.gamma)
    stats = {
        "data": {"train_samples": len(train_records), "train_clips": len({clip_of(r) for r in train_records}),
                 "val_samples": len(val_records), "val_clips": len({clip_of(r) for r in val_records}),
                 "val_source": val_source, "test_clips_in_train_or_val": leaked},
        "val_teacher_forced": val_report, "test_teacher_forced": test_report,
        "live": {k: v for k, v in live.items() if k != "samples"} if live else None,
        "adapter_config": {k: v for k, v in best.config.__dict__.items() if k != "extra"},
    }
    return stats, live["samples"] if live else []


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from common.distributed import make_accelerator
    from common.drafters.token_adapter import TokenAdapter

    set_seed(args.seed)
    accelerator = make_accelerator(args.device)
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(args.device)
    started = time.perf_counter()
    train_records, val_records, val_source = load_splits(args)
    output_dir = Path(args.output_dir) if args.output_dir else TASK_ROOT
    adapter = TokenAdapter(_config_from(train_records + val_records, args)).to(device)
    run = None  # DDP: every rank trains its share; the main process writes the run and does the rest
    if accelerator.is_main_process:
        run = RunFolder.create(STAGE, args.task_name, output_dir=output_dir, resume=False)
        run.write_config(args, list(argv) if argv is not None else None)
        print(f"run folder {run.path}; train {len(train_records)} samples, val {len(val_records)} ({val_source})")
    trained = train(adapter, train_records, val_records, args, run.path / "checkpoint" if run else None,
                    accelerator=accelerator)
    if run is None:  # no barrier: the main process may evaluate live for a long time
        accelerator.end_training()
        return {"run_dir": None, "rank": accelerator.process_index, "best_epoch": trained["best_epoch"],
                "history": trained["history"]}
    best = TokenAdapter.from_pretrained(run.path / "checkpoint", device=device)
    evaluated, samples = evaluate_best(best, args, train_records, val_records, val_source)
    stats = {"best_epoch": trained["best_epoch"], "epochs_run": trained["epochs_run"], **evaluated,
             "seconds": time.perf_counter() - started}
    run.write_results(samples, stats, extra={"history": trained["history"]})
    run.write_markdown(markdown(stats, args, run.path))
    _plots(trained["history"], run.path)
    run.mark_done()
    update_index(results_root_of(run.path))
    if args.star:
        starred = output_dir / "starred" / run.path.name
        shutil.copytree(run.path, starred, dirs_exist_ok=True)
        print(f"starred: {starred}")
    print((run.path / "RESULTS.md").read_text())
    if accelerator.num_processes > 1:
        accelerator.end_training()
    return {"run_dir": str(run.path), "checkpoint": str(run.path / "checkpoint"), "best_epoch": trained["best_epoch"],
            "statistics": stats, "history": trained["history"]}


if __name__ == "__main__":
    run_cli(main)
