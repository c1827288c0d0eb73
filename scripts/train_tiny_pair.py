"""Train a small EventGPT (draft: event frames in) and a small Video-LLaVA (target: 8 video frames in)
from scratch to answer the synthetic driving questions, and save both in the released on-disk formats.

    python -m scripts.train_tiny_pair --dataset_dir data/synthetic_train --output_dir models/ \\
        --eval_dataset_dir data/synthetic_test [--epochs 8 --batch_size 128 --lr 1e-3 --seed 0 --device auto]

Both models are the real classes (our EventGPTForCausalLM, transformers' VideoLlavaForConditionalGeneration)
behind the uniform interface; vision tower, projector and LLM are all trained, with teacher-forced
cross-entropy on the answer tokens and the closing </s> (``vlm.teacher_forced``). Answers come from the
clips' ground truth for every top-50 question (``--max_questions``); each step takes
``batch_size / questions_per_clip`` clips with ``questions_per_clip`` random questions each. Both models
share one tokenizer's base ids (trained on ``common.synthetic.tokenizer_corpus()``).

Every clip's preprocessed frames are computed once (the models' own loaders and image processors, in
``--num_workers`` processes) and cached in DATASET_DIR/.pixel_cache, so training is not I/O bound.

Writes OUTPUT_DIR/eventgpt and OUTPUT_DIR/videollava (config.json, model.safetensors, tokenizer,
processor configs: ``load_vlm`` loads them), OUTPUT_DIR/train_tiny_pair.json (args, sizes, parameter
counts, per-epoch losses and held-out scores, timing) after every epoch, and
OUTPUT_DIR/training_state.safetensors (fp32 weights + optimizer, with the rest as JSON metadata: loading it
runs no code; not part of a shipped pair). A rerun with the same OUTPUT_DIR resumes after the last finished
epoch (``--no_resume`` starts over).

``--init_from DIR`` starts from a trained pair (e.g. models/) instead of random weights and ``--models``
trains only some of the two. ``--teacher_forcing interface`` runs every sample through
``vlm.teacher_forced``; the default lays the same computation out for the whole batch at once (tested
equal, several times faster on a GPU where per-sample overhead dominates).

``--epochs 0 --max_minutes M`` measures the step time during the first warm-up steps and picks the
number of epochs that fits in M minutes; the chosen number is recorded, and rerunning with
``--epochs N`` gives the same schedule and data order.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.training import (
    KINDS,
    SIZE_PRESETS,
    answer_ids,
    batched_teacher_forced_loss,
    count_parameters,
    encode_batch,
    encode_batch_tensor,
    group_by_clip,
    memoize_prompts,
    precompute_pixels_all,
    teacher_forced_loss,
)

STATE_FILE = "training_state.safetensors"
LEGACY_STATE_FILE = "training_state.pt"  # pickled by older versions: never loaded
SUMMARY_FILE = "train_tiny_pair.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.train_tiny_pair", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", required=True, help="synthetic clip dataset to train on (scripts.make_synthetic_dataset)")
    g.add_argument("--split", default="train", help="split of --dataset_dir to train on (default train; 'all' for every entry)")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="use only the first N clips of the training split (each asked up to --max_questions questions)")
    g.add_argument("--max_questions", type=int, default=50, help="top-N questions asked of every clip (default 50)")
    g.add_argument("--eval_dataset_dir", default=None,
                   help="held-out dataset scored after every epoch (teacher-forced loss, token accuracy, greedy exact match)")
    g.add_argument("--eval_split", default="test", help="split of --eval_dataset_dir (default test; 'all' for every entry)")
    g.add_argument("--eval_max_clips", type=int, default=100, help="held-out clips scored per epoch (default 100)")
    g.add_argument("--num_workers", type=int, default=2, help="processes that precompute the frames (default 2)")
    g = p.add_argument_group("models")
    g.add_argument("--size_preset", choices=sorted(SIZE_PRESETS), default="shipped",
                   help="model sizes: 'shipped' (the pair in models/) or 'tiny' (seconds-long smoke tests)")
    g.add_argument("--init_from", default=None,
                   help="start from the weights of a pair folder (DIR/eventgpt, DIR/videollava, e.g. models/) "
                        "instead of random ones; its sizes are used (fresh optimizer)")
    g.add_argument("--models", default="eventgpt,videollava",
                   help="comma-separated models to train (default both); the other is kept as it is")
    g.add_argument("--vocab_size", type=int, default=1000, help="target size of the shared base vocabulary (default 1000)")
    g.add_argument("--save_dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the saved model.safetensors (training always keeps fp32 weights)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=8,
                   help="passes over the training clips (default 8); 0 = as many as fit in --max_minutes")
    g.add_argument("--max_minutes", type=float, default=None,
                   help="stop (and save) when training has run this long; with --epochs 0 it sizes the run")
    g.add_argument("--batch_size", type=int, default=128, help="sequences per step (default 128)")
    g.add_argument("--questions_per_clip", type=int, default=8,
                   help="questions asked of each clip of a step (default 8; clips per step = batch_size / this)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    g.add_argument("--min_lr_ratio", type=float, default=0.05, help="cosine decay floor as a fraction of --lr")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="linear warm-up steps (default 100)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay of matrices (default 0.05)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    g.add_argument("--teacher_forcing", choices=["batched", "interface"], default="batched",
                   help="'interface': per sample through vlm.teacher_forced; 'batched' (default): the same "
                        "computation laid out for the whole batch at once (tested equal; far faster on a GPU)")
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="cut every epoch after N steps (smoke tests)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True, help="folder receiving eventgpt/, videollava/ and the training state")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order and question picks (default 0)")
    g.add_argument("--device", default="auto", help="torch device (default auto: cuda if available, else cpu)")
    g.add_argument("--no_resume", dest="resume", action="store_false",
                   help="start over even if OUTPUT_DIR holds an unfinished run")
    return p


# ----------------------------------------------------------------------------- helpers


def _lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.98), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], **kwargs)


def _save_pair(vlms: dict, sizes: dict, out: Path, save_dtype: str) -> None:
    from common.models.tiny import save_eventgpt, save_videollava

    savers = {"eventgpt": save_eventgpt, "videollava": save_videollava}
    dtype = torch.float16 if save_dtype == "float16" else torch.float32
    for kind, vlm in vlms.items():
        model = copy.deepcopy(vlm.model).to("cpu", dtype)
        model.eval()
        savers[kind](model, vlm.tokenizer, out / kind, sizes[kind])


def _load_resume_state(out: Path) -> dict | None:
    """The unfinished run's state in ``out`` (None if there is none); one line for anything unreadable.

    The state is a safetensors file with JSON metadata (``common.models.state_file``): nothing in it is
    unpickled, so a planted file cannot run code. Pickled states of older versions are refused unread.
    """
    from common.models.errors import ModelLoadError
    from common.models.state_file import load_state

    path = out / STATE_FILE
    if not path.is_file():
        if (out / LEGACY_STATE_FILE).is_file():
            raise SystemExit(f"{out / LEGACY_STATE_FILE}: a pickled training state of an older version is not "
                             "loaded (unpickling can run code); pass --no_resume to start over")
        return None
    fix = "delete it or pass --no_resume to start over"
    try:
        state = load_state(path, fix)
    except ModelLoadError as exc:
        raise SystemExit(str(exc)) from exc
    needed = ("epoch", "epochs", "step", "seed", "size_preset", "history", "models", "optimizers", "schedulers")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise SystemExit(f"{path}: not a training state of this script (keys {', '.join(needed)} expected); {fix}")
    return state


def _split_arg(split: str | None) -> str | None:
    return None if split in (None, "", "all") else split


class _Batches:
    """Deterministic steps of an epoch: (clip indices, clip position per sequence, questions, answers)."""

    def __init__(self, clips, clips_per_batch: int, questions_per_clip: int, seed: int):
        self.clips = clips
        self.clips_per_batch = clips_per_batch
        self.k = questions_per_clip
        self.seed = seed

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.clips) / self.clips_per_batch)

    def epoch(self, epoch: int):
        gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(len(self.clips), generator=gen).tolist()
        for step in range(self.steps_per_epoch()):
            idx = order[step * self.clips_per_batch:(step + 1) * self.clips_per_batch]
            rng = np.random.default_rng([self.seed, epoch, step])
            pos, qa = [], []
            for j, ci in enumerate(idx):
                pairs = self.clips[ci].qa
                picks = rng.choice(len(pairs), size=min(self.k, len(pairs)), replace=False)
                for q in picks.tolist():
                    pos.append(j)
                    qa.append(pairs[q])
            yield idx, pos, qa


def _run_batch(vlm, pixels: torch.Tensor, idx: list[int], pos: list[int], qa: list, ids_cache: dict,
               device: torch.device, amp: bool, batched: bool = True):
    px = pixels[idx].to(device, non_blocking=True).float()
    answers = []
    for _, answer in qa:
        ids = ids_cache.get(answer)
        if ids is None:
            ids = ids_cache[answer] = answer_ids(vlm, answer)
        answers.append(ids)
    questions = [q for q, _ in qa]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if batched:
            layouts = ids_cache.setdefault("__layouts__", {})
            return batched_teacher_forced_loss(vlm, encode_batch_tensor(vlm, px), pos, questions, answers, layouts)
        visuals = encode_batch(vlm, px)
        return teacher_forced_loss(vlm, [visuals[j] for j in pos], questions, answers)


@torch.no_grad()
def _evaluate(vlms: dict, pixels: dict, clips, batch_size: int, device: torch.device, amp: bool,
              ids_cache: dict, batched: bool = True) -> dict:
    """Teacher-forced loss, token accuracy and answer exact match (= greedy exact match) per model."""
    samples = [(ci, qa) for ci, c in enumerate(clips) for qa in c.qa]
    out = {}
    for kind, vlm in vlms.items():
        vlm.model.eval()
        loss_sum, tokens, correct, exact = 0.0, 0, 0, 0
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            idx = sorted({ci for ci, _ in chunk})
            where = {ci: j for j, ci in enumerate(idx)}
            res = _run_batch(vlm, pixels[kind], idx, [where[ci] for ci, _ in chunk], [qa for _, qa in chunk],
                             ids_cache[kind], device, amp, batched)
            loss_sum += float(res.loss) * res.tokens
            tokens += res.tokens
            correct += res.correct
            exact += res.answers_exact
        vlm.model.train()
        out[kind] = {"loss": loss_sum / max(tokens, 1), "token_accuracy": correct / max(tokens, 1),
                     "answer_exact": exact / max(len(samples), 1), "samples": len(samples)}
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) the pair; returns the training summary (also written to OUTPUT_DIR)."""
    from tqdm import tqdm

    from common.cli import resolve_device, set_seed
    from common.models.errors import ModelLoadError
    from common.models.loader import load_vlm
    from common.models.state_file import save_state
    from common.models.tiny import (
        build_eventgpt,
        build_tokenizer,
        build_videollava,
        save_eventgpt,
        save_videollava,
    )
    from common.results import atomic_write_json, to_jsonable
    from common.synthetic import tokenizer_corpus

    args = build_parser().parse_args(argv)
    if args.epochs < 0 or (args.epochs == 0 and not args.max_minutes):
        raise SystemExit("--epochs 0 (auto) needs --max_minutes")
    if args.batch_size < 1 or args.questions_per_clip < 1:
        raise SystemExit("--batch_size and --questions_per_clip must be >= 1")
    wall_start = time.perf_counter()
    device = resolve_device(args.device)
    amp = device.type == "cuda"
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(SIZE_PRESETS[args.size_preset])
    if args.init_from and (Path(args.init_from) / SUMMARY_FILE).is_file():
        from common.models.tiny import TinySize

        made = json.loads((Path(args.init_from) / SUMMARY_FILE).read_text()).get("sizes", {})
        sizes.update({k: TinySize(**v) for k, v in made.items() if k in KINDS})
    train_kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not train_kinds or any(k not in KINDS for k in train_kinds):
        raise SystemExit(f"--models must name some of {', '.join(KINDS)}")
    state_path = out / STATE_FILE

    # ---- data: clips with their (question, answer) pairs, frames precomputed once
    clips = group_by_clip(args.dataset_dir, _split_arg(args.split), args.max_questions, args.max_train_samples)
    if not clips:
        raise SystemExit(f"{args.dataset_dir}: no clips with ground-truth answers in split {args.split!r}")
    eval_clips = []
    if args.eval_dataset_dir:
        eval_clips = group_by_clip(args.eval_dataset_dir, _split_arg(args.eval_split), args.max_questions,
                                   args.eval_max_clips)

    # ---- models: fresh (built, saved, loaded back through load_vlm) or resumed
    state = None
    if args.resume:
        state = _load_resume_state(out)
    if state is not None:
        if state.get("size_preset") != args.size_preset or state.get("seed") != args.seed:
            raise SystemExit(f"{state_path}: a run with other sizes or seed; use another --output_dir or --no_resume")
    if state is None and args.init_from:
        import shutil

        for kind in KINDS:
            if (out / kind).resolve() != (Path(args.init_from) / kind).resolve():
                shutil.copytree(Path(args.init_from) / kind, out / kind, dirs_exist_ok=True)
    elif state is None:
        tokenizer = build_tokenizer(tokenizer_corpus(), args.vocab_size)
        egpt, egpt_tok = build_eventgpt(tokenizer, sizes["eventgpt"], seed=args.seed)
        vllava, vllava_tok = build_videollava(tokenizer, sizes["videollava"], seed=args.seed + 1)
        save_eventgpt(egpt, egpt_tok, out / "eventgpt", sizes["eventgpt"])
        save_videollava(vllava, vllava_tok, out / "videollava", sizes["videollava"])
        del egpt, vllava
    # Training runs on the objects the loader gives, so tokenizer and prompt handling are the inference ones.
    try:
        vlms = {kind: memoize_prompts(load_vlm(kind, out / kind, quant="fp32", device=device)) for kind in KINDS}
    except ModelLoadError as exc:
        raise SystemExit(f"{exc} (the pair of {out}; pass --no_resume to rebuild it)") from exc
    if state is not None:
        for kind in train_kinds:
            try:
                vlms[kind].model.load_state_dict(state["models"][kind])
            except (KeyError, RuntimeError) as exc:
                raise SystemExit(f"{out / STATE_FILE}: its {kind} weights do not fit the model in {out / kind} "
                                 f"({' '.join(str(exc).split())[:160]}); pass --no_resume to start over") from exc
    for vlm in vlms.values():
        vlm.model.train()
    if vlms["eventgpt"].base_vocab_size != vlms["videollava"].base_vocab_size:
        raise SystemExit("the two tokenizers do not share their base vocabulary")

    cache_dirs = {"train": Path(args.dataset_dir) / ".pixel_cache",
                  "eval": Path(args.eval_dataset_dir) / ".pixel_cache" if args.eval_dataset_dir else None}
    specs = {kind: (out / kind, sizes[kind].image_size) for kind in train_kinds}
    pixels = precompute_pixels_all(clips, specs, args.num_workers, cache_dirs["train"], desc="frames (train)")
    eval_pixels = precompute_pixels_all(eval_clips, specs, args.num_workers, cache_dirs["eval"],
                                        desc="frames (eval)") if eval_clips else {}
    if device.type == "cuda":  # a few GB at most: keep every clip on the GPU
        pixels = {k: v.to(device) for k, v in pixels.items()}
        eval_pixels = {k: v.to(device) for k, v in eval_pixels.items()}
    prep_seconds = time.perf_counter() - wall_start

    # ---- optimisation
    clips_per_batch = max(1, args.batch_size // args.questions_per_clip)
    batches = _Batches(clips, clips_per_batch, args.questions_per_clip, args.seed)
    steps_per_epoch = batches.steps_per_epoch()
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    # a rerun continues to --epochs (0: the number the interrupted auto-sized run had picked)
    epochs = args.epochs if (state is None or args.epochs > 0) else state["epochs"]
    schedule = {"total": max(1, (epochs or 1) * steps_per_epoch)}
    opts, scheds = {}, {}
    for kind in train_kinds:
        vlm = vlms[kind]
        opts[kind] = _optimizer(vlm.model, args.lr, args.weight_decay, device)
        scheds[kind] = torch.optim.lr_scheduler.LambdaLR(
            opts[kind], lambda step: _lr_factor(step, args.lr_warmup_steps, schedule["total"], args.min_lr_ratio))
        if state is not None:
            opts[kind].load_state_dict(state["optimizers"][kind])
            scheds[kind].load_state_dict(state["schedulers"][kind])
    ids_cache: dict[str, dict] = {kind: {} for kind in train_kinds}
    history: list[dict] = state["history"] if state is not None else []
    start_epoch = state["epoch"] if state is not None else 0
    global_step = state["step"] if state is not None else 0
    train_seconds = state.get("train_seconds", 0.0) if state is not None else 0.0
    step_losses: dict[str, list[float]] = state.get("step_losses", {k: [] for k in train_kinds}) if state else \
        {k: [] for k in train_kinds}
    params = {kind: count_parameters(vlm.model) for kind, vlm in vlms.items()}
    print(f"train: {len(clips)} clips ({sum(len(c.qa) for c in clips)} question/answer pairs), "
          f"{steps_per_epoch} steps/epoch of {clips_per_batch} clips x {args.questions_per_clip} questions; "
          f"params eventgpt {params['eventgpt']:,} videollava {params['videollava']:,}; device {device}",
          file=sys.stderr)

    batched = args.teacher_forcing == "batched"
    stopped_early = False
    time_limit = args.max_minutes * 60 if args.max_minutes else None
    # --epochs 0: steps probe_start..auto_probe of the first epoch are timed (inside the warm-up)
    probe_start, auto_probe = 15, 40
    epoch = start_epoch
    while epochs == 0 or epoch < epochs:
        epoch_start = time.perf_counter()
        sums = {k: [0.0, 0, 0] for k in train_kinds}  # loss * tokens, tokens, correct
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs or '?'}", unit="step")
        probe_t0 = None
        for step, (idx, pos, qa) in enumerate(batches.epoch(epoch)):
            if step >= steps_per_epoch:
                break
            for kind in train_kinds:
                vlm = vlms[kind]
                res = _run_batch(vlm, pixels[kind], idx, pos, qa, ids_cache[kind], device, amp, batched)
                opts[kind].zero_grad(set_to_none=True)
                res.loss.backward()
                torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), args.grad_clip)
                opts[kind].step()
                scheds[kind].step()
                loss = float(res.loss.detach())
                sums[kind][0] += loss * res.tokens
                sums[kind][1] += res.tokens
                sums[kind][2] += res.correct
                step_losses[kind].append(round(loss, 4))
            global_step += 1
            bar.update()
            bar.set_postfix({k[:4]: f"{sums[k][0] / max(sums[k][1], 1):.3f}" for k in train_kinds})
            if epochs == 0:  # size the run from the measured step time
                if step == probe_start or step == auto_probe - 1 or step == steps_per_epoch - 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                if step == probe_start:
                    probe_t0 = time.perf_counter()
                if step == auto_probe - 1 or step == steps_per_epoch - 1:
                    if probe_t0 is not None and step > probe_start:
                        per_step = (time.perf_counter() - probe_t0) / (step - probe_start)
                    else:
                        per_step = (time.perf_counter() - epoch_start) / (step + 1)
                    eval_steps = 2 * math.ceil(sum(len(c.qa) for c in eval_clips) / args.batch_size)
                    per_epoch = per_step * (steps_per_epoch + 0.5 * eval_steps) + 2.0
                    left = time_limit - (time.perf_counter() - wall_start)
                    epochs = max(1, int(0.95 * left / per_epoch))
                    schedule["total"] = epochs * steps_per_epoch
                    bar.set_description(f"epoch {epoch + 1}/{epochs}")
                    print(f"auto: {per_step * 1000:.0f} ms/step -> {epochs} epochs in {args.max_minutes} min",
                          file=sys.stderr)
            if time_limit is not None and time.perf_counter() - wall_start > time_limit:
                stopped_early = True
                break
        bar.close()
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        record: dict[str, Any] = {"epoch": epoch + 1, "steps": global_step, "seconds": round(epoch_seconds, 2),
                                  "lr_end": scheds[train_kinds[0]].get_last_lr()[0]}
        for kind in train_kinds:
            loss_sum, tokens, correct = sums[kind]
            record[f"{kind}_train_loss"] = loss_sum / max(tokens, 1)
            record[f"{kind}_train_token_accuracy"] = correct / max(tokens, 1)
        if eval_clips:
            for kind, scores in _evaluate({k: vlms[k] for k in train_kinds}, eval_pixels, eval_clips, args.batch_size, device, amp,
                                          ids_cache, batched).items():
                for name, value in scores.items():
                    record[f"{kind}_eval_{name}"] = value
        history.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), file=sys.stderr)
        epoch += 1
        if not stopped_early:
            _save_pair({k: vlms[k] for k in train_kinds}, sizes, out, args.save_dtype)
            save_state({
                "epoch": epoch, "epochs": epochs, "step": global_step, "seed": args.seed,
                "size_preset": args.size_preset, "history": history, "train_seconds": train_seconds,
                "step_losses": step_losses,
                "models": {k: vlms[k].model.state_dict() for k in train_kinds},
                "optimizers": {k: v.state_dict() for k, v in opts.items()},
                "schedulers": {k: v.state_dict() for k, v in scheds.items()},
            }, state_path)
        else:
            _save_pair({k: vlms[k] for k in train_kinds}, sizes, out, args.save_dtype)  # the weights so far (the state keeps the last epoch)
            break

    summary = {
        "command": "python -m scripts.train_tiny_pair " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "epochs": epochs, "epochs_done": epoch, "steps": global_step,
        "stopped_early": stopped_early, "trained_models": train_kinds, "init_from": args.init_from, "device": _device_name(device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "train_dataset": {"dir": str(args.dataset_dir), "split": args.split, "clips": len(clips),
                          "qa_pairs": sum(len(c.qa) for c in clips)},
        "eval_dataset": {"dir": str(args.eval_dataset_dir), "split": args.eval_split, "clips": len(eval_clips),
                         "qa_pairs": sum(len(c.qa) for c in eval_clips)} if eval_clips else None,
        "sizes": {k: vars(v) for k, v in sizes.items()},
        "parameters": params,
        "visual_tokens": {"eventgpt": 5 + (sizes["eventgpt"].image_size // sizes["eventgpt"].patch_size) ** 2 + 1,
                          "videollava": 8 * ((sizes["videollava"].image_size // sizes["videollava"].patch_size) ** 2 + 1)},
        "steps_per_epoch": steps_per_epoch, "clips_per_step": clips_per_batch,
        "seconds": {"prepare": round(prep_seconds, 2), "train": round(train_seconds, 2),
                    "total": round(time.perf_counter() - wall_start, 2)},
        "history": history,
        "first_losses": {k: v[:5] for k, v in step_losses.items()},
        "last_losses": {k: v[-5:] for k, v in step_losses.items()},
        "output_dir": str(out),
    }
    atomic_write_json(out / SUMMARY_FILE, to_jsonable(summary, strict=False))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
