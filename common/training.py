"""Shared helpers to train and score the tiny EventGPT / Video-LLaVA pair on synthetic clips.

Used by ``scripts/train_tiny_pair.py`` (training) and ``scripts/evaluate_pair.py`` (greedy
answers vs ground truth):

- sizes of the shipped pair (``SHIPPED_SIZES``) and of a seconds-long smoke test (``TINY_SIZES``);
- ``group_by_clip``: a dataset's (question, answer) pairs per clip (answers from the synthetic
  ground truth, all top-50 questions);
- ``precompute_pixels``: every clip's visual input exactly as the model's own ``load_visual`` +
  ``preprocess`` make it, once, in worker processes, cached on disk as float16;
- ``encode_batch``: the vision tower + projector of many clips in one call (equal to
  ``vlm.encode_pixels`` per clip), ``answer_ids`` and ``teacher_forced_loss`` (cross-entropy
  on the answer tokens and the closing ``</s>``, through ``vlm.teacher_forced``);
- answer scoring: ``normalize_answer``, ``token_f1``, ``keyword_scores`` and
  ``question_group`` (colour / static / motion / scene questions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.data import ClipDataset, load_event_frames, load_video_frames
from common.events import atomic_write_bytes
from common.models.eventgpt import EVENT_PLACEHOLDER_ID
from common.models.eventgpt_vlm import EventGPTVLM
from common.models.tiny import TinySize
from common.models.videollava_vlm import VideoLlavaVLM
from common.models.vision import clip_image_processor, images_to_pixels
from common.vlm import VisionLanguageModel, VisualInput

# ----------------------------------------------------------------------------- sizes

# The shipped pair: the target is ~5x larger, sees 8 x 50 = 400 video tokens against the draft's
# 5 + 50 = 55 event tokens (112 px, 16 px patches -> 49 patches + CLS per frame).
SHIPPED_SIZES: dict[str, TinySize] = {
    "eventgpt": TinySize(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, vision_hidden=64,
                         vision_layers=2, vision_heads=2, image_size=112, patch_size=16, max_positions=1024),
    # Video-LLaVA reads CLIP layer -2: 3 vision layers -> 2 of them used, as in the released model's 24 -> 23.
    "videollava": TinySize(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, vision_hidden=128,
                           vision_layers=3, vision_heads=4, image_size=112, patch_size=16, max_positions=1024),
}
# Seconds-long smoke tests: 32 px, 16 px patches -> 4 patches + CLS per frame. LLM widths are multiples of
# 64 so that bitsandbytes' packed 4-bit CPU path (AVX512-BF16: in_features % 64, out_features % 32) can
# quantize every layer.
TINY_SIZES: dict[str, TinySize] = {
    "eventgpt": TinySize(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, vision_hidden=16,
                         vision_layers=1, vision_heads=1, image_size=32, patch_size=16, max_positions=512),
    "videollava": TinySize(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, vision_hidden=16,
                           vision_layers=2, vision_heads=1, image_size=32, patch_size=16, max_positions=512),
}
SIZE_PRESETS = {"shipped": SHIPPED_SIZES, "tiny": TINY_SIZES}
KINDS = ("eventgpt", "videollava")
NUM_FRAMES = {"eventgpt": 5, "videollava": 8}  # event frames / video frames per clip


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- data


@dataclass
class ClipQA:
    """One clip: a representative sample (its paths) and every (question, answer) asked of it."""

    clip_id: str
    sample: Any  # common.data.ClipSample
    qa: list[tuple[str, str]] = field(default_factory=list)


def group_by_clip(dataset_dir: str | os.PathLike, split: str | None = None, max_questions: int = 50,
                  max_clips: int | None = None) -> list[ClipQA]:
    """The dataset's clips in index order, each with its (question, ground-truth answer) pairs."""
    ds = ClipDataset(dataset_dir, split=split, max_questions=max_questions)
    clips: dict[str, ClipQA] = {}
    for sample in ds:
        clip = clips.get(sample.clip_id)
        if clip is None:
            if max_clips is not None and len(clips) >= max_clips:
                break
            clip = clips[sample.clip_id] = ClipQA(sample.clip_id, sample)
        if sample.answer:
            clip.qa.append((sample.question, sample.answer))
    return [c for c in clips.values() if c.qa]


def load_image_processor(folder: str | os.PathLike, image_size: int):
    """A checkpoint folder's image processor, preferring transformers' PIL backend.

    The PIL backend is what CPU machines (CI, tests) get; preferring it in training keeps the
    pixels the models learn from identical to the pixels they are evaluated on there.
    """
    import warnings

    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    except Exception:  # noqa: BLE001 - older transformers without backends: the loader's own choice
        return clip_image_processor(folder, image_size)
    finally:
        hf_logging.set_verbosity(verbosity)


def _pixels_of(kind: str, sample: Any, processor: Any) -> np.ndarray:
    """One clip's preprocessed frames (F, 3, S, S) float16: ``load_visual`` + ``preprocess`` of the model."""
    if kind == "eventgpt":
        images = load_event_frames(sample, num_frames=NUM_FRAMES[kind])
    else:
        images = list(load_video_frames(sample, num_frames=NUM_FRAMES[kind]))
    pixels = images_to_pixels(processor, images, torch.device("cpu"), torch.float32)
    return pixels.numpy().astype(np.float16)


_WORKER: dict[str, Any] = {}


def _worker_init(specs: dict[str, tuple[str, int]]) -> None:
    torch.set_num_threads(1)
    _WORKER["processors"] = {kind: load_image_processor(folder, size) for kind, (folder, size) in specs.items()}


def _worker_pixels(sample: Any) -> dict[str, np.ndarray]:
    return {kind: _pixels_of(kind, sample, proc) for kind, proc in _WORKER["processors"].items()}


def precompute_pixels_all(clips: Sequence[ClipQA], specs: dict[str, tuple[str | os.PathLike, int]],
                          num_workers: int = 1, cache_dir: str | os.PathLike | None = None,
                          desc: str = "frames") -> dict[str, torch.Tensor]:
    """Every clip's model inputs {kind: (C, F, 3, S, S) float16} for each ``kind: (processor folder,
    image size)``, in one pass over the clips; cached in ``cache_dir`` per kind.

    Cache files are keyed by the model kind, the processor's configuration and the clip ids.
    """
    from common.progress import progress_bar

    result: dict[str, torch.Tensor] = {}
    files: dict[str, Path | None] = {}
    for kind, (folder, size) in specs.items():
        processor = load_image_processor(folder, size)
        key_text = json.dumps([kind, processor.to_dict(), [str(c.sample.dataset_dir) for c in clips[:1]],
                               [c.clip_id for c in clips]], sort_keys=True, default=str)
        key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
        files[kind] = Path(cache_dir) / f"pixels_{kind}_{size}_{key}.pt" if cache_dir is not None else None
        if files[kind] is not None and files[kind].is_file():
            try:
                cached = torch.load(files[kind], map_location="cpu", weights_only=True)
                if isinstance(cached, torch.Tensor) and cached.shape[0] == len(clips):
                    result[kind] = cached
            except (OSError, RuntimeError, EOFError):
                pass  # rebuilt below
    todo = {kind: (str(folder), size) for kind, (folder, size) in specs.items() if kind not in result}
    if not todo:
        return result
    samples = [c.sample for c in clips]
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in todo}
    bar = progress_bar(len(samples), desc, "clip")
    if num_workers <= 1 or len(samples) < 64:
        processors = {kind: load_image_processor(folder, size) for kind, (folder, size) in todo.items()}
        for s in samples:
            for kind, proc in processors.items():
                out[kind].append(_pixels_of(kind, s, proc))
            bar.update()
    else:
        from multiprocessing import get_context

        with get_context("spawn").Pool(num_workers, initializer=_worker_init, initargs=(todo,)) as pool:
            for arrays in pool.imap(_worker_pixels, samples, chunksize=8):
                for kind, arr in arrays.items():
                    out[kind].append(arr)
                bar.update()
    bar.close()
    for kind, arrays in out.items():
        result[kind] = torch.from_numpy(np.stack(arrays))
        if files[kind] is not None:
            import io

            buf = io.BytesIO()
            torch.save(result[kind], buf)
            atomic_write_bytes(files[kind], buf.getvalue())
    return result


def precompute_pixels(kind: str, clips: Sequence[ClipQA], processor_folder: str | os.PathLike, image_size: int,
                      num_workers: int = 1, cache_dir: str | os.PathLike | None = None,
                      desc: str | None = None) -> torch.Tensor:
    """One model's inputs (C, F, 3, S, S) float16 of every clip (see ``precompute_pixels_all``)."""
    return precompute_pixels_all(clips, {kind: (processor_folder, image_size)}, num_workers, cache_dir,
                                 desc or f"frames {kind}")[kind]


# ----------------------------------------------------------------------------- model side


def memoize_prompts(vlm: VisionLanguageModel) -> VisionLanguageModel:
    """Remember ``vlm.prompt_ids`` per question (``VisionLanguageModel.memoize_prompts``); returns ``vlm``."""
    vlm.memoize_prompts()
    return vlm


def encode_batch_tensor(vlm: VisionLanguageModel, pixels: torch.Tensor) -> torch.Tensor:
    """Visual tokens (B, T, H) of B clips from their pixels (B, F, 3, S, S), in one vision-tower call.

    Row b equals ``vlm.encode_pixels(pixels[b]).embeds`` (EventGPT: per-frame spatial mean +
    temporal mean of the adapted CLIP tokens; Video-LLaVA: ``get_video_features`` over the batch).
    """
    b = pixels.shape[0]
    if isinstance(vlm, EventGPTVLM):
        body = vlm.model.model
        tower_dtype = next(body.visual_tower.parameters()).dtype
        feats = body.visual_tower(pixels.flatten(0, 1).to(tower_dtype))
        feats = body.visual_projector(feats)
        if getattr(body, "feature_adaptor", None) is not None:
            feats = body.feature_adaptor(feats)
        feats = feats.float().reshape(b, pixels.shape[1], *feats.shape[1:])  # (B, N, P+1, H)
        return torch.cat([feats.mean(dim=2), feats.mean(dim=1)], dim=1).to(vlm.dtype)
    if isinstance(vlm, VideoLlavaVLM):
        tower_dtype = next(vlm.model.model.video_tower.parameters()).dtype
        out = vlm.model.model.get_video_features(pixel_values_videos=pixels.to(tower_dtype),
                                                 vision_feature_layer=vlm.model.config.vision_feature_layer)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return feats.reshape(b, -1, feats.shape[-1]).to(vlm.dtype)
    return torch.stack([vlm.encode_pixels(p).embeds for p in pixels])


def encode_batch(vlm: VisionLanguageModel, pixels: torch.Tensor) -> list[VisualInput]:
    """``encode_batch_tensor`` as one ``VisualInput`` per clip (equal to ``vlm.encode_pixels`` per clip)."""
    return [VisualInput(t) for t in encode_batch_tensor(vlm, pixels)]


def prompt_layout(vlm: VisionLanguageModel, question: str, num_visual: int) -> list[int] | None:
    """The prompt's token ids as ``vlm.prompt_embeds`` lays them out, with -1 at the visual slots.

    None for a model this helper does not know (callers then use ``vlm.teacher_forced``).
    """
    if isinstance(vlm, EventGPTVLM):
        ids = list(vlm.prompt_ids(question))
        at = ids.index(EVENT_PLACEHOLDER_ID)
        return ids[:at] + [-1] * num_visual + ids[at + 1:]
    if isinstance(vlm, VideoLlavaVLM):
        return [-1 if t == vlm.video_token_id else t for t in vlm.prompt_ids(question, num_visual)]
    return None


def answer_ids(vlm: VisionLanguageModel, answer: str) -> list[int]:
    """The answer's token ids followed by ``</s>`` (what the model must learn to produce)."""
    return vlm.tokenize(answer) + [vlm.eos_token_id]


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean cross-entropy per answer token
    tokens: int
    correct: int  # teacher-forced argmax hits
    answers_exact: int  # answers whose every token is the argmax


def teacher_forced_loss(vlm: VisionLanguageModel, visuals: Sequence[VisualInput], questions: Sequence[str],
                        answers: Sequence[Sequence[int]]) -> LossOutput:
    """Cross-entropy of the answer tokens given visual + question, via ``vlm.teacher_forced``."""
    tf = vlm.teacher_forced(visuals, questions, answers)
    logits = torch.cat(tf.logits)
    targets = torch.as_tensor([t for a in answers for t in a], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, targets)
    with torch.no_grad():  # counted on the device, read back in one transfer
        lengths = torch.as_tensor([len(a) for a in answers], device=logits.device)
        hits = logits.argmax(-1) == targets
        owner = torch.repeat_interleave(torch.arange(len(answers), device=logits.device), lengths)
        misses = torch.zeros(len(answers), device=logits.device).index_add_(0, owner, (~hits).float())
        correct, exact = torch.stack([hits.sum(), (misses == 0).sum()]).tolist()
    return LossOutput(loss=loss, tokens=int(targets.numel()), correct=int(correct), answers_exact=int(exact))


def batched_teacher_forced_loss(vlm: VisionLanguageModel, visual: torch.Tensor, clip_pos: Sequence[int],
                                questions: Sequence[str], answers: Sequence[Sequence[int]],
                                layouts: dict | None = None) -> LossOutput:
    """``teacher_forced_loss`` computed in a few large operations instead of a few per sample.

    ``visual`` (C, T, H) holds the visual tokens of C clips; sequence i uses clip ``clip_pos[i]``.
    The padded batch is laid out on the host (``prompt_layout``) and copied in one transfer,
    embedded in one lookup, the visual tokens scattered into their slots, and the same decoder
    (``vlm.runner.language_model``) and ``vlm.lm_head`` run once: the same numbers as
    ``vlm.teacher_forced`` (tested). Sequences are right-padded and attention is causal, so the
    padding never reaches a real position and no attention mask is needed (the fast causal kernel
    runs). ``layouts`` caches ``prompt_layout`` per (question, visual tokens).
    """
    device = visual.device
    num_visual = visual.shape[1]
    layouts = {} if layouts is None else layouts
    prompts = []
    for question in questions:
        key = (question, num_visual)
        layout = layouts.get(key)
        if layout is None:
            ids = prompt_layout(vlm, question, num_visual)
            if ids is None:
                raise ValueError(f"no batched prompt layout for {type(vlm).__name__}; use teacher_forced_loss")
            arr = np.asarray(ids, dtype=np.int64)
            layout = layouts[key] = (np.maximum(arr, 0), np.flatnonzero(arr < 0))
        prompts.append(layout)
    n = len(prompts)
    lengths = [len(p[0]) + len(a) for p, a in zip(prompts, answers, strict=True)]
    longest = max(lengths)
    host = np.zeros((n, longest), dtype=np.int64)
    vis_rows, vis_cols, ans_rows, ans_cols, targets = [], [], [], [], []
    for i, ((ids, slots), answer) in enumerate(zip(prompts, answers, strict=True)):
        host[i, : len(ids)] = ids
        host[i, len(ids): len(ids) + len(answer)] = answer
        vis_rows.append(np.full(len(slots), i))
        vis_cols.append(slots)
        ans_rows.append(np.full(len(answer), i))
        ans_cols.append(np.arange(len(ids) - 1, len(ids) - 1 + len(answer)))
        targets.append(np.asarray(answer, dtype=np.int64))
    pos = np.asarray(clip_pos, dtype=np.int64)
    vis_src = (pos[:, None] * num_visual + np.arange(num_visual)[None, :]).reshape(-1) if num_visual else pos[:0]
    vis = np.stack([np.concatenate(vis_rows), np.concatenate(vis_cols), vis_src]) if num_visual else \
        np.zeros((3, 0), dtype=np.int64)
    ans = np.stack([np.concatenate(ans_rows), np.concatenate(ans_cols), np.concatenate(targets)])
    # one host -> device transfer for the token ids and every index
    flat_host = torch.from_numpy(np.concatenate([host.reshape(-1), vis.reshape(-1), ans.reshape(-1)]))
    flat_dev = flat_host.to(device, non_blocking=device.type == "cuda")
    ids_dev = flat_dev[: host.size].view(n, longest)
    vis_dev = flat_dev[host.size: host.size + vis.size].view(3, -1)
    ans_dev = flat_dev[host.size + vis.size:].view(3, -1)
    embeds = vlm.embed_tokens(ids_dev)
    flat = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
    embeds = embeds.index_put((vis_dev[0], vis_dev[1]), flat[vis_dev[2]])
    out = vlm.runner.language_model(inputs_embeds=embeds, use_cache=False)
    hidden = out.last_hidden_state[ans_dev[0], ans_dev[1]]
    logits = vlm.lm_head(hidden).float()
    target = ans_dev[2]
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        hits = logits.argmax(-1) == target
        misses = torch.zeros(n, device=device).index_add_(0, ans_dev[0], (~hits).float())
        correct, exact = torch.stack([hits.sum(), (misses == 0).sum()]).tolist()
    return LossOutput(loss=loss, tokens=int(ans.shape[1]), correct=int(correct), answers_exact=int(exact))


# ----------------------------------------------------------------------------- scoring answers

_PUNCT = re.compile(r"[^\w\s]")

# Question groups: what a question asks about. Colour and static objects/road layout are what an
# event camera barely sees (no colour at all; static things only while the camera moves).
_GROUP_QUESTIONS = {
    "colour": ["what is the color of the car?", "what color is the truck?", "what colors are the vehicles?",
               "is there a white car in the scene?", "is there a red car in the scene?"],
    "static": ["are there lane markings on the road?", "are there any traffic signs?",
               "what static objects can be seen?", "are there any buildings in the scene?",
               "are there any parked cars?", "are there any poles along the road?",
               "how many lanes does the road have?", "what type of road is this?", "is the road straight?",
               "how many static objects are there?", "what is on the side of the road?"],
    "motion": ["is there any moving object in the scene?", "in which direction is the car moving?",
               "are there any pedestrians in the scene?", "are there any cyclists in the scene?",
               "what objects are moving in the scene?", "are there any trucks in the scene?",
               "what is the traffic density on the road?", "is the camera moving?",
               "how many moving objects are there?", "is any vehicle moving to the left?",
               "is any vehicle moving to the right?", "how fast is the fastest object moving?",
               "is there a vehicle approaching the camera?", "is any object moving away from the camera?",
               "what is the pedestrian doing?", "what is the cyclist doing?", "how many pedestrians are there?",
               "is there anything on the road ahead?", "are all objects stationary?",
               "which object is moving fastest?", "describe the motion in the scene.",
               "is the traffic moving smoothly?"],
}
QUESTION_GROUPS = ("colour", "static", "motion", "scene")  # scene: open descriptions mixing everything
_GROUP_OF = {q: g for g, qs in _GROUP_QUESTIONS.items() for q in qs}

# Keyword categories for the soft score: the facts a short answer must get right.
KEYWORDS: dict[str, frozenset[str]] = {
    "count": frozenset("no one two three four five six seven eight nine ten single several".split()),
    "colour": frozenset("red blue green white black yellow silver grey brown beige".split()),
    "direction": frozenset("left right towards away forward stationary parked".split()),
    "yes_no": frozenset(["yes", "no"]),
    "kind": frozenset("car cars truck trucks cyclist cyclists pedestrian pedestrians bicycle building buildings "
                      "pole poles sign signs vehicle vehicles".split()),
}


def _normalise_question(question: str) -> str:
    q = question.replace("<event>", "").replace("<video>", "").strip().lower()
    return " ".join(q.replace("colour", "color").split())


def question_group(question: str) -> str:
    """'colour', 'static', 'motion' or 'scene' (open descriptions) for one of the top-50 questions."""
    return _GROUP_OF.get(_normalise_question(question), "scene")


def normalize_answer(text: str) -> str:
    """Whitespace-collapsed, stripped answer text (exact match compares these)."""
    return " ".join(str(text).split())


def _words(text: str) -> list[str]:
    return _PUNCT.sub(" ", str(text).lower()).split()


def _multiset_f1(pred: list[str], gold: list[str]) -> float:
    if not pred and not gold:
        return 1.0
    if not pred or not gold:
        return 0.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style word F1 (lower-cased, punctuation dropped) between two answers."""
    return _multiset_f1(_words(pred), _words(gold))


def keyword_scores(pred: str, gold: str) -> dict[str, float]:
    """Per keyword category present in ``gold``: 1.0 if ``pred`` holds the same multiset of that
    category's keywords (counts, colours, directions, yes/no, object kinds), else 0.0; plus
    ``all``: word F1 restricted to keywords of every category."""
    pw, gw = _words(pred), _words(gold)
    scores: dict[str, float] = {}
    every = frozenset().union(*KEYWORDS.values())
    for name, vocab in KEYWORDS.items():
        g = [w for w in gw if w in vocab]
        if g:
            p = [w for w in pw if w in vocab]
            scores[name] = float(Counter(p) == Counter(g))
    scores["all"] = _multiset_f1([w for w in pw if w in every], [w for w in gw if w in every])
    return scores


def score_answer(pred: str, gold: str) -> dict[str, Any]:
    """exact (0/1), f1 and keyword scores of one predicted answer against the ground truth."""
    kw = keyword_scores(pred, gold)
    return {"exact": float(normalize_answer(pred) == normalize_answer(gold)), "f1": token_f1(pred, gold),
            "key": kw.pop("all"), "keywords": kw}
