"""Extract aligned hidden states of EventGPT (draft) and Video-LLaVA (target) for adapter training.

    python -m feature_alignment.extract_hidden_states --dataset_dir D --split train \\
        --max_questions 10 --output_dir feature_alignment/hidden/train [--layers -1,-2 \\
        --chunk_size 1000 --batch_size 16 --max_new_tokens 50 --quant 4bit --device cuda]

Pairs are aligned by a shared prefix, never by the index of two free-running outputs: first
the target answers greedily (its own output, the one speculative decoding must reproduce; a
batch is decoded together), then the draft is teacher-forced on the target's answer ids in a
batched padded pass, so row t of both models holds the state just before the same target token
t. The target's rows are recorded while it decodes (``--target_states greedy_pass``: the target
teacher-forced on its own answer, without a second pass over its prompt) or by a second,
teacher-forced pass (``teacher_forced``). Target ids at or above the shared base vocabulary are
fed to the draft as its unk token.

Output (see ``feature_alignment/hidden_store.py``): one safetensors file per chunk (samples
concatenated along positions, with offsets), ``index.json`` rewritten atomically after each
chunk, and the target's LM head weight (``lm_head.safetensors``) once. A rerun resumes from
the index (finished samples skipped, same deterministic order and batches); SIGTERM, SIGINT
or SIGHUP finish the current batch, write what is buffered as a chunk and exit cleanly; a
killed run loses at most the unfinished chunk. ``--num_chunks N --chunk_idx K`` (sharding for
parallel jobs) writes into ``OUTPUT_DIR/part_KK_of_NN/``; readers merge the shards.

Several GPUs: ``accelerate launch --num_processes N -m feature_alignment.extract_hidden_states ...``
(or torchrun) with no --num_chunks: rank r takes shard r of N (``part_RR_of_NN/``, one GPU each),
every rank resumes its own shard, and rank 0 waits for all ranks, then checks that the shards
together hold every planned sample (readers merge them in global sample order).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import (
    add_common_args,
    add_retry_arg,
    positive_int,
    resolve_device,
    resolve_quant,
    set_seed,
    shard,
)
from common.defaults import resolve_dataset_dir, resolve_model_paths
from common.errors import DataError, sample_failure
from common.lazy import no_grad
from common.locations import data_dir
from common.progress import progress_bar
from common.results import file_lock

if TYPE_CHECKING:  # torch and numpy are imported inside the functions, so --help prints fast
    import torch

    from common.data import ClipDataset
    from feature_alignment.hidden_store import SampleRecord

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_ROOT = data_dir("feature_alignment") / "hidden"  # data/feature_alignment/hidden/<split>
# Config keys that must match to resume into an existing folder.
RESUME_KEYS = ("dataset_dir", "split", "max_questions", "eventgpt_path", "videollava_path", "quant", "layers",
               "max_new_tokens", "num_chunks", "chunk_idx", "target_states")
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP")) if s)


def parse_layers(text: str) -> list[int]:
    """``"-1,-2"`` -> [-1, -2] (hidden-state indices: 0 embeddings, i layer i, -1 final normed)."""
    try:
        layers = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, got {text!r}") from exc
    if not layers or len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"--layers needs distinct layer indices, got {text!r}")
    return layers


def join_list_flags(argv: Sequence[str], flags: Sequence[str] = ("--layers",)) -> list[str]:
    """``--layers -1,-2`` -> ``--layers=-1,-2`` (argparse would read ``-1,-2`` as an option)."""
    out, items = [], list(argv)
    i = 0
    while i < len(items):
        if items[i] in flags and i + 1 < len(items):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
        else:
            out.append(items[i])
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feature_alignment.extract_hidden_states",
                                description=__doc__.split("\n\n")[2].replace("\n", " "),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_args(p)
    g = p.add_argument_group("extraction")
    add_retry_arg(g)
    g.add_argument("--chunk_size", type=positive_int, default=1000,
                   help="samples per chunk file (rounded up to whole batches). Default: 1000.")
    g.add_argument("--layers", type=parse_layers, default=[-1, -2],
                   help="hidden layers stored for both models, comma-separated (-1 = final normed state "
                        "that feeds the LM head). Default: -1,-2.")
    g.add_argument("--batch_size", type=positive_int, default=16,
                   help="samples decoded together and teacher-forced in one pass. Default: 16.")
    g.add_argument("--target_states", choices=TARGET_STATES, default="greedy_pass",
                   help="greedy_pass: record the target's states while it decodes its answer (one prompt "
                        "pass); teacher_forced: run the target again over prompt + answer. Default: greedy_pass.")
    g.add_argument("--max_new_tokens", type=positive_int, default=50, help="length cap of the target's answer. Default: 50.")
    return p


# ----------------------------------------------------------------------------- the work

def shared_vocab(draft: Any, target: Any) -> int:
    """Ids below this mean the same token in both models."""
    return min(int(draft.base_vocab_size), int(target.base_vocab_size))


def draft_ids(ids: Sequence[int], limit: int, unk: int) -> list[int]:
    """Target ids as the draft reads them: ids outside the shared base vocabulary become ``unk``."""
    return [int(t) if 0 <= int(t) < limit else unk for t in ids]


def draft_unk_id(draft: Any) -> int:
    unk = getattr(draft.tokenizer, "unk_token_id", None)
    return int(unk) if unk is not None else 0


TARGET_STATES = ("greedy_pass", "teacher_forced")


@no_grad
def target_answers(target: Any, visuals: Sequence[Any], questions: Sequence[str], max_new_tokens: int,
                   ) -> list[list[int]]:
    """The target's own greedy answer ids: one sample with the KV-cached engine, several decoded together
    (``generate_greedy_batch``: one decode step serves the batch)."""
    from common.speculative import autoregressive_generate

    if len(visuals) > 1:
        return target.generate_greedy_batch(visuals, questions, max_new_tokens).answers
    state = target.prefill(visuals[0], questions[0])
    return [autoregressive_generate(target, state, max_new_tokens=max_new_tokens).tokens]


@no_grad
def extract_batch(draft: Any, target: Any, ids: Sequence[str], draft_visuals: Sequence[Any],
                  target_visuals: Sequence[Any], questions: Sequence[str], layers: Sequence[int],
                  max_new_tokens: int, stats: dict[str, Any] | None = None,
                  target_states: str = "greedy_pass") -> list[SampleRecord]:
    """The target answers greedily, then the draft is teacher-forced on those ids in one batched pass.

    ``target_states``: ``greedy_pass`` records the target's states while it decodes its answer
    (batched; each prompt goes through the target once); ``teacher_forced`` runs the target again
    over prompt + answer in a padded batch (the original path; same states up to rounding).
    """
    import torch

    from common.timing import sync
    from feature_alignment.hidden_store import SampleRecord

    if target_states not in TARGET_STATES:
        raise ValueError(f"target_states must be one of {TARGET_STATES}, got {target_states!r}")
    timed = stats is not None  # then wait for the GPU at each timer, so the split is true
    t0 = time.perf_counter()
    if target_states == "greedy_pass":
        greedy = target.generate_greedy_batch(target_visuals, questions, max_new_tokens, hidden_layers=layers)
        answers, target_hidden = greedy.answers, greedy.hidden
    else:
        answers = target_answers(target, target_visuals, questions, max_new_tokens)
    if timed:
        sync(target.device)
    t1 = time.perf_counter()
    if target_states == "teacher_forced":
        target_hidden = target.teacher_forced(target_visuals, questions, answers, hidden_layers=layers,
                                              logits=False).hidden
    limit, unk = shared_vocab(draft, target), draft_unk_id(draft)
    tf_draft = draft.teacher_forced(draft_visuals, questions, [draft_ids(a, limit, unk) for a in answers],
                                    hidden_layers=layers, logits=False)
    if timed:
        sync(draft.device)
    t2 = time.perf_counter()
    if timed:
        stats["generate_seconds"] = stats.get("generate_seconds", 0.0) + (t1 - t0)
        stats["teacher_forced_seconds"] = stats.get("teacher_forced_seconds", 0.0) + (t2 - t1)
        final = next((layer for layer in layers if layer in (-1, target.num_layers)), None)
        if final is not None:  # the target's final state must re-predict its own tokens
            for i, answer in enumerate(answers):
                pred = target.lm_head(target_hidden[final][i]).float().argmax(-1).cpu().tolist()
                stats["self_check_positions"] = stats.get("self_check_positions", 0) + len(pred)
                stats["self_check_matches"] = stats.get("self_check_matches", 0) + sum(
                    int(a == b) for a, b in zip(pred, answer))
    records = []
    for i, sid in enumerate(ids):
        records.append(SampleRecord(
            id=str(sid), target_ids=[int(t) for t in answers[i]],
            draft={layer: tf_draft.hidden[layer][i].to("cpu", torch.float16) for layer in layers},
            target={layer: target_hidden[layer][i].to("cpu", torch.float16) for layer in layers}))
    bad = sum(int((~torch.isfinite(t)).sum()) for r in records for t in (*r.draft.values(), *r.target.values()))
    if bad:  # fp16 tops out at 65504: a state beyond it would be stored as inf
        log.warning("%d hidden values overflow fp16 in samples %s", bad, list(ids))
        if stats is not None:
            stats["nonfinite_values"] = stats.get("nonfinite_values", 0) + bad
    return records


class ClipPixelLoader:
    """Per batch of dataset indices: each sample, its clip's pixels for both models, or its error.

    Pixels are read and preprocessed once per clip: a clip whose questions continue from the
    previous batch gets ``None`` (the caller still holds its encodings). Called in batch order
    from one worker thread (``common.prefetch``).
    """

    def __init__(self, dataset: ClipDataset, draft: Any, target: Any):
        self.dataset, self.draft, self.target = dataset, draft, target
        self.last_clip: str | None = None

    def __call__(self, members: Sequence[int]) -> list[tuple[Any, Any, str | None]]:
        out = []
        for i in members:
            sample = self.dataset.samples[i]
            try:
                sample = self.dataset[i]
                pixels = None
                if sample.clip_id != self.last_clip:
                    self.last_clip = None
                    pixels = (self.draft.preprocess(self.draft.load_visual(sample)),
                              self.target.preprocess(self.target.load_visual(sample)))
                    self.last_clip = sample.clip_id
                out.append((sample, pixels, None))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run (issue #16)
                out.append((sample, None, sample_failure(exc)))
        return out


# ----------------------------------------------------------------------------- run control

class StopFlag:
    """Set by SIGTERM/SIGINT/SIGHUP; the loop then finishes its batch, flushes the chunk and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signal is not None and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        log.warning("signal %s: finishing the current batch, writing the chunk, then exiting", signum)

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: run without handlers
                pass

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def load_models(args: argparse.Namespace, egpt_path: Path, vl_path: Path, device: torch.device, quant: str):
    """(draft, target) behind the uniform interface."""
    from common.models.loader import load_vlm

    draft = load_vlm("eventgpt", egpt_path, quant=quant, device=device, allow_pickle=args.allow_pickle)
    target = load_vlm("videollava", vl_path, quant=quant, device=device)
    return draft, target


def _resolve_split(dataset_dir: Path, split: str | None) -> str:
    from common.data import ClipDataset

    if split:
        return split
    probe = ClipDataset(dataset_dir, split=None)
    splits = sorted({str(e.get("split")) for e in probe.entries})
    if len(splits) != 1:
        raise DataError(f"{dataset_dir}: holds splits {splits}; pick one with --split")
    return splits[0]


def output_folder(args: argparse.Namespace, split: str) -> tuple[Path, Path]:
    """(root, folder): the shard folder is below the root when --num_chunks > 1."""
    root = Path(args.output_dir) if args.output_dir else DEFAULT_OUTPUT_ROOT / split
    if args.num_chunks > 1:
        return root, root / f"part_{args.chunk_idx:02d}_of_{args.num_chunks:02d}"
    return root, root


def run_config(args: argparse.Namespace, dataset_dir: Path, split: str, egpt_path: Path, vl_path: Path,
               quant: str) -> dict[str, Any]:
    return {
        "dataset_dir": str(dataset_dir.resolve()), "split": split, "max_questions": args.max_questions,
        "eventgpt_path": str(egpt_path.resolve()) if egpt_path.exists() else str(egpt_path),
        "videollava_path": str(vl_path.resolve()) if vl_path.exists() else str(vl_path),
        "quant": quant, "layers": list(args.layers), "max_new_tokens": args.max_new_tokens,
        "num_chunks": args.num_chunks, "chunk_idx": args.chunk_idx, "chunk_size": args.chunk_size,
        "batch_size": args.batch_size, "max_samples": args.max_samples,
        "target_states": args.target_states,
        "alignment": "target: its greedy answer (states recorded while decoding it, or teacher-forced again); "
                     "draft: teacher-forced on those ids; row t = state before target token t",
    }


def _check_resume(index: dict[str, Any], config: dict[str, Any], folder: Path) -> None:
    old = {"target_states": "teacher_forced", **index["config"]}  # folders from before the option
    diff = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(f"{folder / 'index.json'}: made with other settings ({shown}); use another "
                         "--output_dir or delete that folder")


def main(argv: Sequence[str] | None = None, *, models: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) an extraction; returns a summary dict. ``models`` = (draft, target) already loaded."""
    args = build_parser().parse_args(join_list_flags(sys.argv[1:] if argv is None else argv))
    from common.data import ClipDataset
    from common.distributed import launcher_chunks, local_device
    from feature_alignment.hidden_store import LOCK_FILE

    if args.batch_size < 1 or args.chunk_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch_size, --chunk_size and --max_new_tokens must be >= 1")
    # under accelerate/torchrun: rank r takes shard r of WORLD_SIZE
    args.num_chunks, args.chunk_idx, launched = launcher_chunks(args.num_chunks, args.chunk_idx)
    set_seed(args.seed)
    dataset_dir = resolve_dataset_dir(args.dataset_dir)
    egpt_path, vl_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    device = resolve_device(local_device(args.device))
    quant = resolve_quant(args)
    split = _resolve_split(dataset_dir, args.split)
    dataset = ClipDataset(dataset_dir, split=split, max_questions=args.max_questions,
                          allow_pickle=args.allow_pickle)
    planned = list(range(len(dataset)))
    if args.max_samples is not None:
        planned = planned[: args.max_samples]
    planned = shard(planned, args.num_chunks, args.chunk_idx)
    planned_ids = [dataset.samples[i].id for i in planned]
    root, folder = output_folder(args, split)
    config = run_config(args, dataset_dir, split, egpt_path, vl_path, quant)

    stop = StopFlag()
    with file_lock(folder / LOCK_FILE, wait=False, remove=True, what=str(folder),
                   hint="extract into another --output_dir"):
        stop.install()
        try:
            summary = _run(args, dataset, planned, planned_ids, root, folder, config, device, quant, egpt_path,
                           vl_path, stop, models)
        finally:
            stop.restore()
    if launched:
        summary.update(merge_launched(root, args, dataset, summary, time.perf_counter()))
    return summary


def exit_status(summary: dict[str, Any]) -> int:
    """128 + the signal after a stop by signal (the shell's convention), 1 when every planned sample failed,
    else 0."""
    if summary.get("signal"):
        return 128 + int(summary["signal"])
    if summary.get("planned_samples") and not summary.get("num_samples") and summary.get("failed"):
        return 1
    return 0


def merge_launched(root: Path, args: argparse.Namespace, dataset: ClipDataset, summary: dict[str, Any],
                   finished: float) -> dict[str, Any]:
    """After every rank finished its shard: rank 0 checks the merged view (all shards, global order).

    Also the whole launch's throughput: new samples of all ranks over the time from the common
    start of the loops (after every rank loaded its models) to the last rank's end.
    """
    from common.distributed import all_sum, barrier, destroy, world
    from feature_alignment.hidden_store import HiddenStore

    rank, size, _ = world()
    new_samples = all_sum(summary["new_samples"])  # returns once every rank is done
    seconds = summary["loop_seconds"] + time.perf_counter() - finished  # this rank's loop + waiting for the rest
    out: dict[str, Any] = {"rank": rank, "world_size": size, "all_ranks_new_samples": int(new_samples),
                           "all_ranks_loop_seconds": seconds,
                           "all_ranks_samples_per_second": new_samples / seconds if new_samples else None}
    if rank == 0:
        planned = list(range(len(dataset)))
        if args.max_samples is not None:
            planned = planned[: args.max_samples]
        store = HiddenStore.open(root)
        failed = {f["id"] for i in store.indexes for f in i["failed"]}
        want = [dataset.samples[i].id for i in planned if dataset.samples[i].id not in failed]
        merged_ok = store.complete and store.sample_ids() == want
        out.update(merged_complete=merged_ok, merged_samples=store.num_samples,
                   merged_positions=store.num_positions)
        if not merged_ok:
            log.warning("%s: the shards do not hold every planned sample yet (complete=%s, %d/%d samples); "
                        "rerun the same command to resume", root, store.complete, store.num_samples, len(want))
    barrier()
    destroy()
    return out


def drop_bad_chunks(folder: Path, index: dict[str, Any]) -> int:
    """Verify every chunk of ``index`` against its recorded size and checksum; a missing, truncated or
    corrupt one is dropped from the index (its file deleted) so its samples are extracted again."""
    from feature_alignment.hidden_store import chunk_problem, save_index

    bad = []
    for entry in index["chunks"]:
        problem = chunk_problem(folder, entry)
        if problem is not None:
            log.warning("%s; its %d samples will be extracted again", problem, entry["num_samples"])
            bad.append(entry)
    for entry in bad:
        index["chunks"].remove(entry)
        (folder / entry["file"]).unlink(missing_ok=True)
    if bad:
        index["complete"] = False
        save_index(folder, index)
    return len(bad)


def open_index(folder: Path, config: dict[str, Any], planned_ids: list[str], retry_failed: bool) -> dict[str, Any]:
    """The folder's index (new, or checked for resume: same settings, every chunk intact), with the
    failed samples cleared when they are to be retried."""
    from feature_alignment.hidden_store import load_index, new_index

    index = load_index(folder)
    if index is None:
        return new_index(config, planned_ids)
    _check_resume(index, config, folder)
    index["config"].update({k: config[k] for k in ("chunk_size", "batch_size", "max_samples")})
    drop_bad_chunks(folder, index)
    if retry_failed and index["failed"]:
        log.info("%s: retrying %d failed samples", folder, len(index["failed"]))
        index["failed"] = []
    return index


def record_models(index: dict[str, Any], root: Path, config: dict[str, Any], draft: Any, target: Any,
                  need_head: bool) -> None:
    """The models' sizes into the index config; the target's LM head saved once at the root."""
    from feature_alignment.hidden_store import LM_HEAD_FILE, save_lm_head

    index["config"].update({
        "draft_hidden_size": draft.hidden_size, "target_hidden_size": target.hidden_size,
        "draft_num_layers": draft.num_layers, "target_num_layers": target.num_layers,
        "draft_base_vocab_size": int(draft.base_vocab_size),
        "target_base_vocab_size": int(target.base_vocab_size),
        "shared_vocab_size": shared_vocab(draft, target), "target_vocab_size": target.vocab_size,
        "target_eos_token_id": target.eos_token_id})
    if need_head:
        save_lm_head(root / LM_HEAD_FILE, target.lm_head.weight,
                     {"base_vocab_size": int(target.base_vocab_size), "shared_vocab_size": shared_vocab(draft, target),
                      "vocab_size": target.vocab_size, "hidden_size": target.hidden_size,
                      "videollava_path": config["videollava_path"]})


def close_index(folder: Path, index: dict[str, Any], planned_ids: list[str], stats: dict[str, Any],
                seconds: float) -> dict[str, Any]:
    """Chunks in planned order, ``complete``, this run's stats added to the index's; saved. Returns the stats."""
    from feature_alignment.hidden_store import save_index

    order = {sid: n for n, sid in enumerate(planned_ids)}
    index["chunks"].sort(key=lambda c: order.get(c["sample_ids"][0], len(order)))
    finished = {s for c in index["chunks"] for s in c["sample_ids"]} | {f["id"] for f in index["failed"]}
    index["complete"] = all(s in finished for s in planned_ids)
    run_stats = index.setdefault("stats", {})
    for key in ("generate_seconds", "teacher_forced_seconds", "self_check_positions", "self_check_matches",
                "nonfinite_values"):
        run_stats[key] = run_stats.get(key, 0) + stats.get(key, 0)
    run_stats["seconds"] = run_stats.get("seconds", 0.0) + seconds
    if run_stats.get("self_check_positions"):
        run_stats["self_check_rate"] = run_stats["self_check_matches"] / run_stats["self_check_positions"]
    save_index(folder, index)
    return run_stats


def _run(args, dataset, planned, planned_ids, root, folder, config, device, quant, egpt_path, vl_path, stop,
         models) -> dict[str, Any]:
    from common.distributed import barrier
    from common.prefetch import prefetched
    from feature_alignment.hidden_store import LM_HEAD_FILE, next_chunk_name, save_index, write_chunk

    index = open_index(folder, config, planned_ids, args.retry_failed)
    done = {s for c in index["chunks"] for s in c["sample_ids"]}
    failed = {f["id"] for f in index["failed"]}
    index["planned_samples"] = len(planned_ids)
    todo = [(pos, i) for pos, i in enumerate(planned) if dataset.samples[i].id not in done | failed]
    stats: dict[str, Any] = {}
    start = time.perf_counter()
    need_head = not (root / LM_HEAD_FILE).is_file()
    if todo or need_head:
        if models is None:
            models = load_models(args, egpt_path, vl_path, device, quant)
        draft, target = models
        record_models(index, root, config, draft, target, need_head)
    save_index(folder, index)
    barrier()  # under a launcher every rank starts its loop together (model loading is not timed below)
    loop_start = time.perf_counter()

    # batches are fixed slices of the planned order, so a resumed run forms the same batches
    batches: dict[int, list[int]] = {}
    for pos, i in todo:
        batches.setdefault(pos // args.batch_size, []).append(i)
    buffer: list[SampleRecord] = []
    written = 0
    bar = progress_bar(len(planned_ids), f"extract {config['split']}", "sample",
                       initial=len(planned_ids) - len(todo))

    def flush() -> None:
        nonlocal buffer, written
        if not buffer:
            return
        name = next_chunk_name(index)
        index["chunks"].append(write_chunk(folder / name, buffer, args.layers))
        save_index(folder, index)
        written += len(buffer)
        buffer = []
        elapsed = time.perf_counter() - loop_start
        rate = written / elapsed if elapsed > 0 else 0.0
        left = len(planned_ids) - index["num_samples"] - len(index["failed"])
        log.info("%s: %d/%d samples, %.2f samples/s, about %.0f s left", name, index["num_samples"],
                 len(planned_ids), rate, left / rate if rate > 0 else float("nan"))

    visuals: dict[str, tuple[Any, Any]] = {}  # the current clip's encodings (its questions are consecutive)
    try:
        # disk reads and pixel preprocessing of the next batches run on a thread beside the GPU work
        work = prefetched(batches.values(), ClipPixelLoader(dataset, *models)) if batches else iter(())
        keys = iter(batches)
        previous = None
        for members, loaded in work:
            key = next(keys)
            if previous is not None and key != previous + 1:
                flush()  # a chunk holds one contiguous run of the planned order (a redone chunk stays in place)
            previous = key
            samples, d_vis, t_vis = [], [], []
            for sample, pixels, error in loaded:
                if error is not None:
                    index["failed"].append({"id": sample.id, "error": error})
                    log.warning("skipping %s: %s", sample.id, error)
                    continue
                if sample.clip_id not in visuals:
                    visuals.clear()
                    visuals[sample.clip_id] = (draft.encode_pixels(pixels[0]), target.encode_pixels(pixels[1]))
                d_vis.append(visuals[sample.clip_id][0])
                t_vis.append(visuals[sample.clip_id][1])
                samples.append(sample)
            if samples:
                buffer.extend(extract_batch(draft, target, [s.id for s in samples], d_vis, t_vis,
                                            [s.question for s in samples], args.layers, args.max_new_tokens,
                                            stats, target_states=args.target_states))
            bar.update(len(members))
            if len(buffer) >= args.chunk_size or stop:
                flush()
            if stop:
                break
        flush()
    finally:
        bar.close()
    seconds, loop_seconds = time.perf_counter() - start, time.perf_counter() - loop_start
    run_stats = close_index(folder, index, planned_ids, stats, seconds)
    summary = {
        "output_dir": str(folder), "root": str(root), "complete": index["complete"],
        "interrupted": bool(stop), "signal": stop.signal, "planned_samples": len(planned_ids),
        "num_samples": index["num_samples"], "num_positions": index["num_positions"],
        "num_chunks": len(index["chunks"]), "new_samples": written, "failed": len(index["failed"]),
        "seconds": seconds, "loop_seconds": loop_seconds,
        "samples_per_second": written / loop_seconds if written else None,
        "self_check_rate": run_stats.get("self_check_rate"),
        "lm_head": str(root / LM_HEAD_FILE),
    }
    log.info("extraction: %s samples (%s positions) in %s, %.2f samples/s%s", summary.get("num_samples"),
             summary.get("num_positions"), summary.get("output_dir"), summary.get("samples_per_second") or 0.0,
             "" if summary.get("complete") else " (not complete: rerun to continue)")
    return summary


def _cli(argv: Sequence[str]) -> dict[str, Any]:
    result = main(argv)
    print({k: result[k] for k in ("output_dir", "complete", "num_samples", "num_positions", "num_chunks",
                                  "samples_per_second", "rank", "merged_complete", "merged_samples",
                                  "all_ranks_samples_per_second") if k in result})
    return result


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(_cli, exit_code=exit_status)
