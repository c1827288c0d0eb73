"""Extract token pairs: both models answer every (clip, question) greedily; one JSON line per sample.

Examples:
    python -m token_alignment.extract_tokens --split train --max_questions 10 \\
        --output_file data/token_alignment/train_10q.jsonl
    python -m token_alignment.extract_tokens --dataset_dir D --eventgpt_path P --videollava_path P \\
        --split test --max_questions 1 --output_file F --parallel --quant 4bit

Sequential mode (default) keeps one model in memory at a time: all EventGPT answers first, then
all Video-LLaVA answers, then EventGPT teacher forced on each Video-LLaVA answer (its greedy next
token at every target position: what a live EventGPT drafter proposes there), each appended to
the same file as record parts; when all are in, the file is compacted into one line per sample.
Records name the checkpoints that wrote them (egpt_model, videollava_model); resuming a file
with other checkpoints is refused.
``--parallel`` keeps both models loaded and writes complete lines directly.

Every line is flushed and fsynced as it is written. A rerun resumes: finished samples (and
finished parts) are skipped, a truncated last line from a killed run is dropped, nothing is
written twice. A lock file (OUTPUT.lock) makes a second run for the same output wait for the
first. Model paths and the dataset default to the embedded pair and synthetic split
(common.defaults). ``--num_chunks/--chunk_idx`` shard the samples: give each shard its own
--output_file; training accepts several token files (or merge them with
``python -m token_alignment.merge_tokens PARTS... --output_file F``).

Several GPUs: ``accelerate launch --num_processes N -m token_alignment.extract_tokens ...`` (or
torchrun) with no --num_chunks: rank r takes shard r of N and writes ``F.part_RR_of_NN.jsonl``
(resumable per rank); when all ranks are done rank 0 writes the merged ``F`` atomically, in global
sample order.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import add_common_args, add_retry_arg, positive_int, set_seed, shard
from common.defaults import resolve_dataset_dir, resolve_model_paths
from common.errors import sample_failure
from common.lazy import no_grad
from common.progress import progress, progress_bar
from token_alignment.pairs import (
    DRAFT_KEYS,
    DRAFT_TF_KEYS,
    TARGET_KEYS,
    append_jsonl,
    compact,
    file_lock,
    merge_parts,
    read_jsonl,
)

if TYPE_CHECKING:  # torch and numpy are imported inside the functions, so --help prints fast
    from common.data import ClipSample

DEFAULT_OUTPUT_DIR = Path("data") / "token_alignment"
ALL_KEYS = DRAFT_KEYS + TARGET_KEYS + DRAFT_TF_KEYS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m token_alignment.extract_tokens",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    add_common_args(p, models=True, data=True, output=False)
    g = p.add_argument_group("extraction")
    g.add_argument("--output_file", type=str, default=None,
                   help="JSON Lines file to write/resume. Default: data/token_alignment/"
                        "<split>_<max_questions>q_tokens.jsonl (chunk suffix when sharded).")
    g.add_argument("--parallel", action="store_true",
                   help="Keep both models loaded and write complete records (more memory). Default: sequential.")
    g.add_argument("--max_new_tokens", type=positive_int, default=50,
                   help="Greedy answer length cap per model. Default: 50.")
    add_retry_arg(g)
    g.add_argument("--batch_size", type=positive_int, default=1,
                   help="sequential mode: samples answered together (one decode step serves the batch) and "
                        "teacher-forced in one pass. The answers equal one-at-a-time greedy decoding (tested in "
                        "fp32; in bf16 a near-tie may resolve differently); each sample's *_time is then its share "
                        "of the batch. Default: 1.")
    return p


def default_output_file(split: str | None, max_questions: int, num_chunks: int = 1, chunk_idx: int = 0) -> Path:
    name = f"{split or 'all'}_{max_questions}q_tokens"
    if num_chunks > 1:
        name += f"_chunk{chunk_idx}of{num_chunks}"
    return DEFAULT_OUTPUT_DIR / f"{name}.jsonl"


def part_file(output: Path, num_chunks: int, chunk_idx: int) -> Path:
    """The file rank ``chunk_idx`` of a launched run writes: ``F.part_KK_of_NN.jsonl`` beside ``F``."""
    return output.with_name(f"{output.stem}.part_{chunk_idx:02d}_of_{num_chunks:02d}{output.suffix or '.jsonl'}")


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _sample_fields(sample: ClipSample, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "id": sample.id, "clip_id": sample.clip_id, "split": sample.split,
        "question": sample.question, "query": sample.question,
        "event_data": _rel(sample.event_path, sample.dataset_dir),
        "video_data": _rel(sample.video_path or sample.frames_dir, sample.dataset_dir),
        "dataset_dir": str(sample.dataset_dir), "max_questions": args.max_questions,
        "max_new_tokens": args.max_new_tokens, "event_source": sample.event_source,
    }


class _VisualCache:
    """The last clip's visual input (questions of one clip come in a row: encode once)."""

    def __init__(self, model: Any):
        self.model, self.key, self.value = model, None, None

    def get(self, sample: ClipSample):
        if self.key != sample.clip_id:
            self.value, self.key = self.model.encode(sample), sample.clip_id
        return self.value


def _answer_record(model: Any, sample: ClipSample, ids: Sequence[int], seconds: float, stop_reason: str,
                   prefix: str) -> dict:
    """One model's answer part of a record: prompt, ids, text, seconds, stop reason, vocabulary sizes."""
    return {
        f"{prefix}_prompt": model.build_prompt(sample.question),
        f"{prefix}_token_ids": list(ids),
        prefix: model.decode_text(ids),
        f"{prefix}_time": seconds,
        f"{prefix}_stop_reason": stop_reason,
        f"{prefix}_vocab_size": int(model.vocab_size),
        f"{prefix}_base_vocab_size": int(model.base_vocab_size),
    }


def _answer(model: Any, visual: Any, sample: ClipSample, max_new_tokens: int, prefix: str) -> dict:
    """Greedy answer of ``model`` (generated ids only) with its prompt, text and seconds."""
    from common.speculative import autoregressive_generate

    start = time.perf_counter()
    state = model.prefill(visual, sample.question)
    gen = autoregressive_generate(model, state, max_new_tokens=max_new_tokens)
    return _answer_record(model, sample, gen.tokens, time.perf_counter() - start, gen.stop_reason, prefix)


def _answers(model: Any, visuals: Sequence[Any], samples: Sequence[ClipSample], max_new_tokens: int,
             prefix: str) -> list[dict]:
    """``_answer`` for several samples decoded together (``generate_greedy_batch``)."""
    start = time.perf_counter()
    answers = model.generate_greedy_batch(visuals, [s.question for s in samples], max_new_tokens).answers
    share = (time.perf_counter() - start) / len(samples)
    return [_answer_record(model, s, ids, share,
                           "stop_token" if ids and ids[-1] == model.eos_token_id else "max_new_tokens", prefix)
            for s, ids in zip(samples, answers, strict=True)]


@no_grad
def _draft_teacher_forced(egpt: Any, visuals: Sequence[Any], samples: Sequence[ClipSample],
                          target_ids: Sequence[Sequence[int]], target_base_vocab: Sequence[int]) -> list[dict]:
    """EventGPT teacher forced on the target's answers (one padded pass): its masked greedy next token
    at every target position."""
    from common.drafters.token_adapter import masked_argmax, safe_draft_ids

    out: list[dict | None] = [None] * len(samples)
    unk = getattr(egpt.tokenizer, "unk_token_id", None)
    rows = []
    for n, (ids, base) in enumerate(zip(target_ids, target_base_vocab, strict=True)):
        limit = min(int(egpt.base_vocab_size), int(base))
        if not ids:
            out[n] = {"egpt_tf_token_ids": [], "vocab_limit": limit}
        else:
            rows.append((n, limit, safe_draft_ids(ids, limit, int(unk) if unk is not None and 0 <= int(unk) < limit
                                                  else 0)))
    if rows:
        forced = egpt.teacher_forced([visuals[n] for n, _, _ in rows], [samples[n].question for n, _, _ in rows],
                                     [ids for _, _, ids in rows])
        for (n, limit, _), logits in zip(rows, forced.logits, strict=True):
            out[n] = {"egpt_tf_token_ids": [masked_argmax(row, limit) for row in logits], "vocab_limit": limit}
    return out


def _phase_parts(kind: str, model: Any, visuals: Sequence[Any], samples: Sequence[ClipSample], have: dict,
                 args: argparse.Namespace) -> list[dict]:
    """One sequential-mode part for each sample: the draft answer, the target answer, or the draft teacher forced."""
    if kind in ("draft", "target"):
        prefix = "egpt" if kind == "draft" else "videollava"
        if len(samples) == 1:
            return [_answer(model, visuals[0], samples[0], args.max_new_tokens, prefix)]
        return _answers(model, visuals, samples, args.max_new_tokens, prefix)
    recs = [have[s.id] for s in samples]
    return _draft_teacher_forced(model, visuals, samples, [r["videollava_token_ids"] for r in recs],
                                 [r["videollava_base_vocab_size"] for r in recs])


def model_id(path: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint cheaply: its resolved folder and the total size of its weight files."""
    folder = Path(path).resolve()
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
    return {"path": str(folder), "weights_bytes": size}


def check_same_models(have: dict, output: Path, ids: dict[str, dict]) -> None:
    """Refuse to resume a file that other checkpoints wrote (its pairs would silently mix two model pairs)."""
    for rec in have.values():
        for key, want in ids.items():
            found = rec.get(key)
            if found is not None and found != want:
                raise SystemExit(f"{output}: was extracted with {key} {found['path']} "
                                 f"({found['weights_bytes']} weight bytes), not {want['path']} "
                                 f"({want['weights_bytes']}); pass another --output_file or delete it")


SETTING_KEYS = ("max_new_tokens", "max_questions")


def check_same_settings(have: dict, output: Path, wanted: dict[str, Any]) -> None:
    """Refuse to resume a file written with another answer cap or question count (one line naming them)."""
    found: dict[str, set] = {}
    for rec in have.values():
        for key in SETTING_KEYS:
            if key in rec and rec[key] != wanted[key]:
                found.setdefault(key, set()).add(rec[key])
    if found:
        shown = ", ".join(f"{k} {sorted(v)} -> {wanted[k]}" for k, v in sorted(found.items()))
        raise SystemExit(f"{output}: resume refused, its records were made with other settings ({shown}); "
                         "rerun with the same flags, or pass another --output_file")


def _complete(have: dict, sample: ClipSample) -> bool:
    return all(k in have.get(sample.id, {}) for k in ALL_KEYS)


def _load(kind: str, path: Path, args: argparse.Namespace):
    from common.models.loader import load_vlm

    kwargs = {"allow_pickle": True} if kind == "eventgpt" and args.allow_pickle else {}
    return load_vlm(kind, path, quant=args.quant, device=args.device, **kwargs)


def _release_memory() -> None:
    """Give freed model memory back (call after dropping the last reference to a model)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def output_files(output_file: str | None, split: str | None, max_questions: int, num_chunks: int, chunk_idx: int,
                 launched: bool) -> tuple[Path, Path]:
    """(merged file, the file this process writes): a launched rank writes its part beside the merged file."""
    merged = Path(output_file) if output_file else default_output_file(split, max_questions)
    if launched:
        return merged, part_file(merged, num_chunks, chunk_idx)
    return merged, Path(output_file) if output_file else default_output_file(split, max_questions, num_chunks,
                                                                             chunk_idx)


def guarded(fn: Any, sample: ClipSample, errors: list[tuple[str, str]]) -> Any:
    """``fn(sample)``; any failure of that sample (not KeyboardInterrupt) is added to ``errors``, giving None."""
    try:
        return fn(sample)
    except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the run (issue #16)
        text = sample_failure(exc)
        warnings.warn(f"skipping {sample.id}: {text}", stacklevel=3)
        errors.append((sample.id, text))
        return None


def _report(output: Path, samples: Sequence[ClipSample], have: dict, errors: list[tuple[str, str]],
            written: dict[str, int], seconds: float) -> dict[str, Any]:
    """The run's summary (complete and failed samples, raw token match), printed in two lines."""
    done = [have[s.id] for s in samples if _complete(have, s)]
    positions = sum(len(r["videollava_token_ids"]) for r in done)
    same = sum(int(a == b) for r in done for a, b in zip(r["egpt_token_ids"], r["videollava_token_ids"]))
    summary = {
        "output_file": str(output), "num_samples": len(samples), "num_complete": len(done),
        "written": written, "errors": [list(e) for e in errors], "seconds": seconds,
        "raw_position_match_rate": same / positions if positions else None,
    }
    print(f"{output}: {len(done)}/{len(samples)} samples complete; raw token match by position "
          f"{summary['raw_position_match_rate']}")
    by_id = {s.id: s for s in samples}
    failed = sorted({str(sid) for sid, _ in errors if sid not in by_id or not _complete(have, by_id[sid])})
    summary["num_failed"] = len(failed)
    if failed:  # one sample can fail in several phases: count it once
        print(f"{output}: skipped {len(failed)} sample{'s' if len(failed) != 1 else ''} with bad files (listed "
              f"under 'errors'), e.g. {errors[0][0]}: {errors[0][1]}; failed samples are never written, so a "
              "rerun (with or without --retry_failed) tries them again")
    return summary


def planned_samples(dataset_dir: Path, args: argparse.Namespace, errors: list[tuple[str, str]]) -> list[ClipSample]:
    """This run's samples (--split, --max_questions, --max_samples, this shard); unreadable ones go to ``errors``."""
    from common.data import ClipDataset

    dataset = ClipDataset(dataset_dir, split=args.split, max_questions=args.max_questions,
                          allow_pickle=args.allow_pickle, event_source=args.event_source)
    samples = list(dataset.iter_samples(deep=False, errors=errors))
    if args.max_samples is not None:
        samples = samples[: args.max_samples]
    return shard(samples, args.num_chunks, args.chunk_idx)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from common.distributed import launcher_chunks, local_device

    set_seed(args.seed)
    # under accelerate/torchrun: rank r takes shard r of WORLD_SIZE
    args.num_chunks, args.chunk_idx, launched = launcher_chunks(args.num_chunks, args.chunk_idx)
    args.device = local_device(args.device)
    egpt_path, vllava_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
    dataset_dir = resolve_dataset_dir(args.dataset_dir)
    merged_output, output = output_files(args.output_file, args.split, args.max_questions, args.num_chunks,
                                         args.chunk_idx, launched)
    errors: list[tuple[str, str]] = []
    samples = planned_samples(dataset_dir, args, errors)
    start = time.perf_counter()
    written = {"draft": 0, "target": 0, "draft_tf": 0, "complete": 0}

    ids = {"egpt_model": model_id(egpt_path), "videollava_model": model_id(vllava_path)}
    with file_lock(output):
        have = merge_parts(read_jsonl(output))
        check_same_models(have, output, ids)
        check_same_settings(have, output, {"max_new_tokens": args.max_new_tokens,
                                           "max_questions": args.max_questions})

        def pending(keys: Sequence[str]) -> list[ClipSample]:
            return [s for s in samples if not all(k in have.get(s.id, {}) for k in keys)]

        def save(sample: ClipSample, part: dict, kind: str) -> None:
            record = {**_sample_fields(sample, args), **part}
            if kind in ("draft", "draft_tf", "complete"):
                record["egpt_model"] = ids["egpt_model"]
            if kind in ("target", "complete"):
                record["videollava_model"] = ids["videollava_model"]
            append_jsonl(output, record)
            have.setdefault(sample.id, {}).update(record)
            written[kind] += 1

        todo = pending(ALL_KEYS)
        print(f"{output}: {len(samples)} samples, {len(samples) - len(todo)} already done, "
              f"{'parallel' if args.parallel else 'sequential'} mode")
        if todo and args.parallel:
            egpt, vllava = _load("eventgpt", egpt_path, args), _load("videollava", vllava_path, args)
            ecache, vcache = _VisualCache(egpt), _VisualCache(vllava)

            def whole(s: ClipSample) -> dict:
                rec = dict(have.get(s.id, {}))
                if not all(k in rec for k in DRAFT_KEYS):
                    rec.update(_answer(egpt, ecache.get(s), s, args.max_new_tokens, "egpt"))
                if not all(k in rec for k in TARGET_KEYS):
                    rec.update(_answer(vllava, vcache.get(s), s, args.max_new_tokens, "videollava"))
                rec.update(_draft_teacher_forced(egpt, [ecache.get(s)], [s], [rec["videollava_token_ids"]],
                                                 [rec["videollava_base_vocab_size"]])[0])
                return rec

            for s in progress(todo, "token pairs", "sample"):
                rec = guarded(whole, s, errors)
                if rec is not None:
                    save(s, rec, "complete")
            del whole, ecache, vcache, egpt, vllava
            _release_memory()
        elif todo:
            phases = [
                ("draft", "eventgpt", egpt_path, DRAFT_KEYS, "EventGPT answers"),
                ("target", "videollava", vllava_path, TARGET_KEYS, "Video-LLaVA answers"),
                ("draft_tf", "eventgpt", egpt_path, DRAFT_TF_KEYS, "EventGPT on target answers"),
            ]
            for kind, model_kind, path, keys, desc in phases:
                todo_phase = pending(keys)
                if kind == "draft_tf":  # needs the target answer first
                    todo_phase = [s for s in todo_phase if "videollava_token_ids" in have.get(s.id, {})]
                if not todo_phase:
                    continue
                model = _load(model_kind, path, args)
                cache = _VisualCache(model)
                bar = progress_bar(len(todo_phase), desc, "sample")
                for at in range(0, len(todo_phase), args.batch_size):
                    batch = todo_phase[at:at + args.batch_size]
                    visuals = [guarded(cache.get, s, errors) for s in batch]  # None: bad files, recorded
                    ready = [(s, v) for s, v in zip(batch, visuals) if v is not None]
                    if ready:
                        parts = _phase_parts(kind, model, [v for _, v in ready], [s for s, _ in ready], have, args)
                        for (s, _), part in zip(ready, parts, strict=True):
                            save(s, part, kind)
                    bar.update(len(batch))
                bar.close()
                del cache, model
                _release_memory()
        lines = len(read_jsonl(output))
        if lines > len(have) and all(_complete(have, s) for s in samples):
            compact(output, order=[s.id for s in samples])
    summary = _report(output, samples, have, errors, written, time.perf_counter() - start)
    summary.update(eventgpt_path=str(egpt_path), videollava_path=str(vllava_path), dataset_dir=str(dataset_dir))
    if launched:
        summary.update(_merge_launched(merged_output, args.num_chunks,
                                       complete=summary["num_complete"] == len(samples)))
    return summary


def _merge_launched(merged_output: Path, num_chunks: int, complete: bool) -> dict:
    """Every rank waits; rank 0 then writes the merged file from all parts (global order), atomically."""
    from common.distributed import all_true, barrier, destroy, world

    rank, size, _ = world()
    barrier()
    all_complete = all_true(complete)  # every rank's "all my samples complete" flag
    out: dict[str, Any] = {"rank": rank, "world_size": size, "merged_file": str(merged_output),
                           "merged_complete": all_complete}
    if rank == 0:
        if all_complete:
            from token_alignment.merge_tokens import merge_token_files

            parts = [part_file(merged_output, num_chunks, k) for k in range(num_chunks)]
            out["merged_samples"] = merge_token_files(parts, merged_output)["num_samples"]
            print(f"{merged_output}: merged {out['merged_samples']} samples from {num_chunks} parts")
        else:
            print(f"{merged_output}: not merged, some ranks have unfinished or failed samples; rerun the same "
                  "command to resume (or merge the parts with python -m token_alignment.merge_tokens)")
    barrier()
    destroy()
    return out


def exit_status(result: dict[str, Any]) -> int:
    """1 when samples were planned and none is complete (every one failed), else 0."""
    return 1 if result["num_samples"] and not result["num_complete"] else 0


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main, exit_code=exit_status)
