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
from dataclasses import dataclass, field
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
    g.add_argument("--event_image_norm", choices=["keep", "white"], default="keep",
                   help="EventGPT's pixel normalisation (its preprocessor_config.json): 'keep' (default) the init "
                        "pair's (CLIP's for a new pair); 'white': mean 1.0, so the event frames' white background "
                        "is 0 and only events reach the vision tower (with CLIP's mean the background swamps the "
                        "sparse events: the shipped draft's visual tokens barely differ between clips)")
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
        if kind == "eventgpt":  # keep the pair's pixel normalisation (--event_image_norm)
            proc = vlm.image_processor
            save_eventgpt(model, vlm.tokenizer, out / kind, sizes[kind], proc.image_mean, proc.image_std)
        else:
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


# ----------------------------------------------------------------------------- main steps


@dataclass
class _Run:
    """Everything one training run carries from step to step (models, optimisers, progress, timing)."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    sizes: dict
    train_kinds: list[str]
    wall_start: float
    vlms: dict = field(default_factory=dict)
    clips: list = field(default_factory=list)
    eval_clips: list = field(default_factory=list)
    pixels: dict = field(default_factory=dict)
    eval_pixels: dict = field(default_factory=dict)
    prep_seconds: float = 0.0
    batches: Any = None
    steps_per_epoch: int = 0
    clips_per_batch: int = 0
    epochs: int = 0
    schedule: dict = field(default_factory=dict)
    opts: dict = field(default_factory=dict)
    scheds: dict = field(default_factory=dict)
    ids_cache: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    epoch: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    step_losses: dict = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batched(self) -> bool:
        return self.args.teacher_forcing == "batched"

    @property
    def time_limit(self) -> float | None:
        return self.args.max_minutes * 60 if self.args.max_minutes else None


def _check_args(args: argparse.Namespace) -> list[str]:
    """One line per bad flag combination; returns the models to train (``--models``)."""
    if args.epochs < 0 or (args.epochs == 0 and not args.max_minutes):
        raise SystemExit("--epochs 0 (auto) needs --max_minutes")
    if args.batch_size < 1 or args.questions_per_clip < 1:
        raise SystemExit("--batch_size and --questions_per_clip must be >= 1")
    train_kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not train_kinds or any(k not in KINDS for k in train_kinds):
        raise SystemExit(f"--models must name some of {', '.join(KINDS)}")
    return train_kinds


def _sizes(args: argparse.Namespace) -> dict:
    """The preset's sizes, or those of the ``--init_from`` pair."""
    sizes = dict(SIZE_PRESETS[args.size_preset])
    if args.init_from and (Path(args.init_from) / SUMMARY_FILE).is_file():
        from common.models.tiny import TinySize

        made = json.loads((Path(args.init_from) / SUMMARY_FILE).read_text()).get("sizes", {})
        sizes.update({k: TinySize(**v) for k, v in made.items() if k in KINDS})
    return sizes


def _load_clips(args: argparse.Namespace) -> tuple[list, list]:
    """Training and held-out clips with their (question, answer) pairs."""
    clips = group_by_clip(args.dataset_dir, _split_arg(args.split), args.max_questions, args.max_train_samples)
    if not clips:
        raise SystemExit(f"{args.dataset_dir}: no clips with ground-truth answers in split {args.split!r}")
    eval_clips = []
    if args.eval_dataset_dir:
        eval_clips = group_by_clip(args.eval_dataset_dir, _split_arg(args.eval_split), args.max_questions,
                                   args.eval_max_clips)
    return clips, eval_clips


def _write_initial_pair(args: argparse.Namespace, out: Path, sizes: dict) -> None:
    """A fresh pair in ``out``: copied from ``--init_from``, or built with random weights."""
    from common.models.tiny import (
        build_eventgpt,
        build_tokenizer,
        build_videollava,
        save_eventgpt,
        save_videollava,
    )
    from common.synthetic import tokenizer_corpus

    if args.init_from:
        import shutil

        for kind in KINDS:
            if (out / kind).resolve() != (Path(args.init_from) / kind).resolve():
                shutil.copytree(Path(args.init_from) / kind, out / kind, dirs_exist_ok=True)
        return
    tokenizer = build_tokenizer(tokenizer_corpus(), args.vocab_size)
    egpt, egpt_tok = build_eventgpt(tokenizer, sizes["eventgpt"], seed=args.seed)
    vllava, vllava_tok = build_videollava(tokenizer, sizes["videollava"], seed=args.seed + 1)
    save_eventgpt(egpt, egpt_tok, out / "eventgpt", sizes["eventgpt"])
    save_videollava(vllava, vllava_tok, out / "videollava", sizes["videollava"])


def _set_image_mean(config_path: Path, value: float) -> None:
    """Set every channel of a preprocessor config's ``image_mean`` to ``value``."""
    config = json.loads(config_path.read_text())
    config["image_mean"] = [value] * len(config.get("image_mean", [0, 0, 0]))
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _load_models(run: _Run, state: dict | None) -> None:
    """Fresh (built, saved, loaded back through load_vlm) or resumed models into ``run.vlms``."""
    from common.models.errors import ModelLoadError
    from common.models.loader import load_vlm

    out = run.out
    if state is None:
        _write_initial_pair(run.args, out, run.sizes)
        if run.args.event_image_norm == "white":
            _set_image_mean(out / "eventgpt" / "preprocessor_config.json", 1.0)
    # Training runs on the objects the loader gives, so tokenizer and prompt handling are the inference ones.
    try:
        run.vlms = {kind: memoize_prompts(load_vlm(kind, out / kind, quant="fp32", device=run.device))
                    for kind in KINDS}
    except ModelLoadError as exc:
        raise SystemExit(f"{exc} (the pair of {out}; pass --no_resume to rebuild it)") from exc
    if state is not None:
        for kind in run.train_kinds:
            try:
                run.vlms[kind].model.load_state_dict(state["models"][kind])
            except (KeyError, RuntimeError) as exc:
                raise SystemExit(f"{out / STATE_FILE}: its {kind} weights do not fit the model in {out / kind} "
                                 f"({' '.join(str(exc).split())[:160]}); pass --no_resume to start over") from exc
    for vlm in run.vlms.values():
        vlm.model.train()
    if run.vlms["eventgpt"].base_vocab_size != run.vlms["videollava"].base_vocab_size:
        raise SystemExit("the two tokenizers do not share their base vocabulary")


def _prepare_pixels(run: _Run) -> None:
    """Every clip's frames, computed once (cached next to the datasets), on the GPU when there is one."""
    args = run.args
    cache_dirs = {"train": Path(args.dataset_dir) / ".pixel_cache",
                  "eval": Path(args.eval_dataset_dir) / ".pixel_cache" if args.eval_dataset_dir else None}
    specs = {kind: (run.out / kind, run.sizes[kind].image_size) for kind in run.train_kinds}
    run.pixels = precompute_pixels_all(run.clips, specs, args.num_workers, cache_dirs["train"], desc="frames (train)")
    run.eval_pixels = precompute_pixels_all(run.eval_clips, specs, args.num_workers, cache_dirs["eval"],
                                            desc="frames (eval)") if run.eval_clips else {}
    if run.device.type == "cuda":  # a few GB at most: keep every clip on the GPU
        run.pixels = {k: v.to(run.device) for k, v in run.pixels.items()}
        run.eval_pixels = {k: v.to(run.device) for k, v in run.eval_pixels.items()}


def _setup_optimisation(run: _Run, state: dict | None) -> None:
    """Batches, epochs, optimisers and schedules (restored when resuming) and the progress so far."""
    args = run.args
    run.clips_per_batch = max(1, args.batch_size // args.questions_per_clip)
    run.batches = _Batches(run.clips, run.clips_per_batch, args.questions_per_clip, args.seed)
    run.steps_per_epoch = run.batches.steps_per_epoch()
    if args.max_steps_per_epoch:
        run.steps_per_epoch = min(run.steps_per_epoch, args.max_steps_per_epoch)
    # a rerun continues to --epochs (0: the number the interrupted auto-sized run had picked)
    run.epochs = args.epochs if (state is None or args.epochs > 0) else state["epochs"]
    run.schedule = schedule = {"total": max(1, (run.epochs or 1) * run.steps_per_epoch)}
    for kind in run.train_kinds:
        run.opts[kind] = _optimizer(run.vlms[kind].model, args.lr, args.weight_decay, run.device)
        run.scheds[kind] = torch.optim.lr_scheduler.LambdaLR(
            run.opts[kind], lambda step: _lr_factor(step, args.lr_warmup_steps, schedule["total"], args.min_lr_ratio))
        if state is not None:
            run.opts[kind].load_state_dict(state["optimizers"][kind])
            run.scheds[kind].load_state_dict(state["schedulers"][kind])
    run.ids_cache = {kind: {} for kind in run.train_kinds}
    run.step_losses = {k: [] for k in run.train_kinds}
    if state is not None:
        run.history, run.epoch, run.global_step = state["history"], state["epoch"], state["step"]
        run.train_seconds = state.get("train_seconds", 0.0)
        run.step_losses = state.get("step_losses", run.step_losses)


def _train_step(run: _Run, idx: list[int], pos: list[int], qa: list, sums: dict) -> None:
    """One optimiser step of every trained model on the same batch; adds to ``sums`` and the step losses."""
    for kind in run.train_kinds:
        vlm = run.vlms[kind]
        res = _run_batch(vlm, run.pixels[kind], idx, pos, qa, run.ids_cache[kind], run.device, run.amp, run.batched)
        run.opts[kind].zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.model.parameters(), run.args.grad_clip)
        run.opts[kind].step()
        run.scheds[kind].step()
        loss = float(res.loss.detach())
        sums[kind][0] += loss * res.tokens
        sums[kind][1] += res.tokens
        sums[kind][2] += res.correct
        run.step_losses[kind].append(round(loss, 4))


class _AutoEpochs:
    """--epochs 0: steps ``probe_start``..``probe_end`` of the first epoch are timed (inside the warm-up) and the
    number of epochs that fits in --max_minutes is picked from them."""

    probe_start, probe_end = 15, 40

    def __init__(self, run: _Run, epoch_start: float):
        self.run, self.epoch_start, self.t0 = run, epoch_start, None

    def after_step(self, step: int, bar: Any) -> None:
        run = self.run
        last = step == self.probe_end - 1 or step == run.steps_per_epoch - 1
        if (step == self.probe_start or last) and run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        if step == self.probe_start:
            self.t0 = time.perf_counter()
        if not last:
            return
        if self.t0 is not None and step > self.probe_start:
            per_step = (time.perf_counter() - self.t0) / (step - self.probe_start)
        else:
            per_step = (time.perf_counter() - self.epoch_start) / (step + 1)
        eval_steps = 2 * math.ceil(sum(len(c.qa) for c in run.eval_clips) / run.args.batch_size)
        per_epoch = per_step * (run.steps_per_epoch + 0.5 * eval_steps) + 2.0
        left = run.time_limit - (time.perf_counter() - run.wall_start)
        run.epochs = max(1, int(0.95 * left / per_epoch))
        run.schedule["total"] = run.epochs * run.steps_per_epoch
        bar.set_description(f"epoch {run.epoch + 1}/{run.epochs}")
        print(f"auto: {per_step * 1000:.0f} ms/step -> {run.epochs} epochs in {run.args.max_minutes} min",
              file=sys.stderr)


def _train_epoch(run: _Run) -> dict[str, list]:
    """One epoch (or until the time limit); returns {kind: [loss * tokens, tokens, correct]}."""
    from tqdm import tqdm

    epoch_start = time.perf_counter()
    sums = {k: [0.0, 0, 0] for k in run.train_kinds}
    auto = _AutoEpochs(run, epoch_start)
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {run.epoch + 1}/{run.epochs or '?'}", unit="step")
    for step, (idx, pos, qa) in enumerate(run.batches.epoch(run.epoch)):
        if step >= run.steps_per_epoch:
            break
        _train_step(run, idx, pos, qa, sums)
        run.global_step += 1
        bar.update()
        bar.set_postfix({k[:4]: f"{sums[k][0] / max(sums[k][1], 1):.3f}" for k in run.train_kinds})
        if run.epochs == 0:  # size the run from the measured step time
            auto.after_step(step, bar)
        if run.time_limit is not None and time.perf_counter() - run.wall_start > run.time_limit:
            run.stopped_early = True
            break
    bar.close()
    return sums


def _epoch_record(run: _Run, sums: dict, seconds: float) -> dict[str, Any]:
    """The history row of the epoch just trained: train loss/accuracy and the held-out scores."""
    record: dict[str, Any] = {"epoch": run.epoch + 1, "steps": run.global_step, "seconds": round(seconds, 2),
                              "lr_end": run.scheds[run.train_kinds[0]].get_last_lr()[0]}
    for kind in run.train_kinds:
        loss_sum, tokens, correct = sums[kind]
        record[f"{kind}_train_loss"] = loss_sum / max(tokens, 1)
        record[f"{kind}_train_token_accuracy"] = correct / max(tokens, 1)
    if run.eval_clips:
        scores_of = _evaluate({k: run.vlms[k] for k in run.train_kinds}, run.eval_pixels, run.eval_clips,
                              run.args.batch_size, run.device, run.amp, run.ids_cache, run.batched)
        for kind, scores in scores_of.items():
            for name, value in scores.items():
                record[f"{kind}_eval_{name}"] = value
    return record


def _save_progress(run: _Run) -> None:
    """The pair so far, and (after a finished epoch) the state a rerun resumes from."""
    from common.models.state_file import save_state

    args = run.args
    _save_pair({k: run.vlms[k] for k in run.train_kinds}, run.sizes, run.out, args.save_dtype)
    if run.stopped_early:
        return  # the state keeps the last finished epoch
    save_state({
        "epoch": run.epoch, "epochs": run.epochs, "step": run.global_step, "seed": args.seed,
        "size_preset": args.size_preset, "history": run.history, "train_seconds": run.train_seconds,
        "step_losses": run.step_losses,
        "models": {k: run.vlms[k].model.state_dict() for k in run.train_kinds},
        "optimizers": {k: v.state_dict() for k, v in run.opts.items()},
        "schedulers": {k: v.state_dict() for k, v in run.scheds.items()},
    }, run.out / STATE_FILE)


def _summary(run: _Run, argv: list[str] | None) -> dict[str, Any]:
    """The run's summary (written to OUTPUT_DIR/train_tiny_pair.json)."""
    args, sizes, clips, eval_clips = run.args, run.sizes, run.clips, run.eval_clips
    return {
        "command": "python -m scripts.train_tiny_pair " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "epochs": run.epochs, "epochs_done": run.epoch, "steps": run.global_step,
        "stopped_early": run.stopped_early, "trained_models": run.train_kinds, "init_from": args.init_from,
        "device": _device_name(run.device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "train_dataset": {"dir": str(args.dataset_dir), "split": args.split, "clips": len(clips),
                          "qa_pairs": sum(len(c.qa) for c in clips)},
        "eval_dataset": {"dir": str(args.eval_dataset_dir), "split": args.eval_split, "clips": len(eval_clips),
                         "qa_pairs": sum(len(c.qa) for c in eval_clips)} if eval_clips else None,
        "sizes": {k: vars(v) for k, v in sizes.items()},
        "parameters": {kind: count_parameters(vlm.model) for kind, vlm in run.vlms.items()},
        "visual_tokens": {"eventgpt": 5 + (sizes["eventgpt"].image_size // sizes["eventgpt"].patch_size) ** 2 + 1,
                          "videollava": 8 * ((sizes["videollava"].image_size // sizes["videollava"].patch_size) ** 2
                                             + 1)},
        "steps_per_epoch": run.steps_per_epoch, "clips_per_step": run.clips_per_batch,
        "seconds": {"prepare": round(run.prep_seconds, 2), "train": round(run.train_seconds, 2),
                    "total": round(time.perf_counter() - run.wall_start, 2)},
        "history": run.history,
        "first_losses": {k: v[:5] for k, v in run.step_losses.items()},
        "last_losses": {k: v[-5:] for k, v in run.step_losses.items()},
        "output_dir": str(run.out),
    }


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) the pair; returns the training summary (also written to OUTPUT_DIR)."""
    from common.cli import resolve_device, set_seed
    from common.results import atomic_write_json, to_jsonable

    args = build_parser().parse_args(argv)
    train_kinds = _check_args(args)
    wall_start = time.perf_counter()
    device = resolve_device(args.device)
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(args, out, device, _sizes(args), train_kinds, wall_start)
    run.clips, run.eval_clips = _load_clips(args)
    state = _load_resume_state(out) if args.resume else None
    if state is not None and (state.get("size_preset") != args.size_preset or state.get("seed") != args.seed):
        raise SystemExit(f"{out / STATE_FILE}: a run with other sizes or seed; use another --output_dir or --no_resume")
    _load_models(run, state)
    _prepare_pixels(run)
    run.prep_seconds = time.perf_counter() - wall_start
    _setup_optimisation(run, state)
    params = {kind: count_parameters(vlm.model) for kind, vlm in run.vlms.items()}
    print(f"train: {len(run.clips)} clips ({sum(len(c.qa) for c in run.clips)} question/answer pairs), "
          f"{run.steps_per_epoch} steps/epoch of {run.clips_per_batch} clips x {args.questions_per_clip} questions; "
          f"params eventgpt {params['eventgpt']:,} videollava {params['videollava']:,}; device {device}",
          file=sys.stderr)
    while run.epochs == 0 or run.epoch < run.epochs:
        epoch_start = time.perf_counter()
        sums = _train_epoch(run)
        seconds = time.perf_counter() - epoch_start
        run.train_seconds += seconds
        record = _epoch_record(run, sums, seconds)
        run.history.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), file=sys.stderr)
        run.epoch += 1
        _save_progress(run)
        if run.stopped_early:
            break
    summary = _summary(run, argv)
    atomic_write_json(out / SUMMARY_FILE, to_jsonable(summary, strict=False))
    return summary


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
