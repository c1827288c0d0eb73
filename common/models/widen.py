"""Widen a trained EventGPT / Video-LLaVA checkpoint to a larger LLM shape without changing its function.

The widened model (the "twin") computes the small model's function while every LLM step costs
what a step of the larger shape costs:

- hidden dims: the small model lives in the first ``d_small`` residual dims; every projection
  that writes the residual (``o_proj``, ``down_proj``, embeddings, visual projector) writes zero
  into the others, so they stay exactly zero;
- RMSNorm: over ``d_big`` dims with zero padding the mean square shrinks by ``d_small / d_big``;
  the norm weights are scaled by ``sqrt(d_small / d_big)`` and ``rms_norm_eps`` by
  ``d_small / d_big`` (one eps in the config), which makes every norm exact;
- heads: small head ``h`` sits in big head ``h``; extra heads have zero q/k/v rows and zero
  ``o_proj`` columns. Inside a head, small rotary pair ``i`` (dims ``i`` and ``i + hd_s/2``,
  transformers' rotate-half layout) goes to big pair ``r * i`` with ``r = hd_big / hd_small``:
  ``theta^(-2 r i / hd_big) = theta^(-2 i / hd_small)``, so the same ``rope_theta`` keeps every
  frequency. q rows are scaled by ``sqrt(r)`` so that ``q.k / sqrt(hd_big)`` is unchanged;
- MLP: extra units have zero gate/up rows and zero ``down_proj`` columns; extra layers (after
  the small ones) have all-zero projections, so they are the identity on the residual;
- vocabulary: rows above the small vocabulary copy the small LM head's last row (a special or
  padding id the model never answers with), and config.json's ``answer_vocab_size`` makes
  ``common.vlm`` score them -inf (``VocabLimitedHead``): they are never produced, greedy or
  sampled, and never proposed; the head still multiplies by every row, so it costs a 7B head;
- visual prompt: ``visual_pad_tokens`` in config.json makes the model prepend that many masked
  positions to every prompt (see ``common.vlm``): they are computed like real tokens, no real
  token attends to them, and rotary attention only sees relative positions, so answers stay.

Vision towers are copied unchanged (the trained small towers).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import DataError

KINDS = ("eventgpt", "videollava")
MODEL_TYPES = {"eventgpt": "EventChat_llama", "videollava": "video_llava"}
SHAPES = ("7b", "small")
SHARD_BYTES = 4 * 1024**3
# Visual tokens of the real pair (REFERENCE.md): EventGPT 5 + 577, Video-LLaVA 8 x 257.
REAL_VISUAL_TOKENS = {"eventgpt": 582, "videollava": 2056}
# Embedding/LM-head rows of the real pair: 32000 + EventGPT's 4 tokens; 32003 padded to 64.
REAL_VOCAB = {"eventgpt": 32004, "videollava": 32064}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)$")
_LAYER_PARTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class LlmShape:
    """The LLaMA decoder shape of a checkpoint (or of a widening target)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int


@dataclass(frozen=True)
class WidenPlan:
    """What one model is widened to: the LLM shape and the visual prompt length to pad to."""

    shape: LlmShape
    visual_tokens: int


LLAMA_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, head_dim=128, intermediate_size=11008,
                max_positions=4096)


def _fail(path: Path, reason: str) -> DataError:
    return DataError(f"{path}: {reason}")


def text_config(config: dict, kind: str) -> dict:
    """The LLaMA part of a checkpoint's config dict (EventGPT: top level; Video-LLaVA: ``text_config``)."""
    return config if kind == "eventgpt" else config.get("text_config", {})


def read_shape(config: dict, kind: str, config_file: Path) -> LlmShape:
    """The LLM shape of ``config``; refuses what cannot be widened exactly (one line naming the file)."""
    if config.get("model_type") != MODEL_TYPES[kind]:
        raise _fail(config_file, f"unknown architecture (model_type {config.get('model_type')!r}); "
                    f"widen_pair widens {MODEL_TYPES[kind]!r} checkpoints only")
    text = text_config(config, kind)
    heads = int(text.get("num_attention_heads", 0) or 0)
    hidden = int(text.get("hidden_size", 0) or 0)
    if not heads or not hidden:
        raise _fail(config_file, "unknown architecture (no hidden_size / num_attention_heads in the LLM config)")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    problems = [
        (text.get("num_key_value_heads") not in (None, heads), "grouped-query attention"),
        (text.get("hidden_act", "silu") != "silu", f"hidden_act {text.get('hidden_act')!r}"),
        (bool(text.get("attention_bias")) or bool(text.get("mlp_bias")), "biases in the decoder"),
        (rope.get("rope_type", rope.get("type", "default")) != "default", "scaled rotary embeddings"),
        (bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings"))), "tied word embeddings"),
    ]
    for bad, what in problems:
        if bad:
            raise _fail(config_file, f"unknown architecture ({what}); widen_pair widens plain LLaMA decoders only")
    return LlmShape(hidden_size=hidden, num_layers=int(text["num_hidden_layers"]), num_heads=heads,
                    head_dim=int(text.get("head_dim") or hidden // heads),
                    intermediate_size=int(text["intermediate_size"]), vocab_size=int(text["vocab_size"]),
                    max_positions=int(text.get("max_position_embeddings", 2048)))


def visual_token_count(config: dict, kind: str, num_event_frames: int = 5) -> int:
    """Visual tokens the checkpoint puts into a prompt (EventGPT: frames + patches + 1; Video-LLaVA: 8 x (patches + 1))."""
    vision = config.get("visual_tower_config") if kind == "eventgpt" else config.get("vision_config")
    if not vision or "image_size" not in vision or "patch_size" not in vision:
        return 0
    tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
    return num_event_frames + tokens if kind == "eventgpt" else 8 * tokens


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_for(kind: str, shape_name: str, src: LlmShape, visual_tokens: int) -> WidenPlan:
    """``7b``: the Vicuna-7B LLM and the real visual token counts; ``small``: every dimension and the depth doubled.

    ``small`` doubles heads and head_dim (hidden x 4), layers, MLP units, vocabulary and visual tokens.
    """
    if shape_name == "7b":
        shape = LlmShape(**LLAMA_7B, vocab_size=REAL_VOCAB[kind])
        return WidenPlan(shape, REAL_VISUAL_TOKENS[kind])
    if shape_name == "small":
        shape = LlmShape(hidden_size=4 * src.hidden_size, num_layers=2 * src.num_layers, num_heads=2 * src.num_heads,
                         head_dim=2 * src.head_dim, intermediate_size=2 * src.intermediate_size,
                         vocab_size=_pad_to(2 * src.vocab_size, 64), max_positions=2 * src.max_positions)
        return WidenPlan(shape, 2 * visual_tokens)
    raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {shape_name!r}")


def check_fits(src: LlmShape, big: LlmShape, config_file: Path) -> None:
    """Refuse a target shape the source cannot be placed into exactly."""
    if src.vocab_size > big.vocab_size:
        raise _fail(config_file, f"vocabulary of {src.vocab_size} ids is larger than the target shape's "
                    f"{big.vocab_size}; it cannot be widened to that shape")
    for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size"):
        if getattr(src, name) > getattr(big, name):
            raise _fail(config_file, f"{name} {getattr(src, name)} is larger than the target shape's "
                        f"{getattr(big, name)}")
    if big.head_dim % src.head_dim or src.head_dim % 2 or big.num_heads * big.head_dim != big.hidden_size:
        raise _fail(config_file, f"head_dim {src.head_dim} does not divide the target's {big.head_dim}; "
                    "rotary frequencies cannot be matched")


class LlmWidener:
    """Maps each LLM tensor of a small checkpoint to its place in the big shape (float32 math)."""

    def __init__(self, src: LlmShape, big: LlmShape):
        self.src, self.big = src, big
        self.ratio = big.head_dim // src.head_dim
        self.norm_scale = math.sqrt(src.hidden_size / big.hidden_size)
        self.head_rows = self._head_rows()

    def _head_rows(self) -> torch.Tensor:
        """Big q/k/v row of each small row: head h stays h, rotary pair i moves to pair ratio * i."""
        s, b, r = self.src.head_dim, self.big.head_dim, self.ratio
        d = torch.arange(s)
        within = torch.where(d < s // 2, r * d, b // 2 + r * (d - s // 2))
        return (torch.arange(self.src.num_heads)[:, None] * b + within[None, :]).reshape(-1)

    def _place(self, w: torch.Tensor, rows: int, cols: int, row_index: torch.Tensor | None = None,
               col_index: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros((rows, cols), dtype=torch.float32)
        r_idx = row_index if row_index is not None else torch.arange(w.shape[0])
        c_idx = col_index if col_index is not None else torch.arange(w.shape[1])
        out[r_idx[:, None], c_idx[None, :]] = w.float()
        return out

    def norm(self, w: torch.Tensor | None) -> torch.Tensor:
        """An RMSNorm weight: scaled by sqrt(d_small / d_big) on the small dims (ones elsewhere)."""
        out = torch.ones(self.big.hidden_size)
        if w is not None:
            out[: w.shape[0]] = w.float() * self.norm_scale
        return out

    def layer_part(self, part: str, w: torch.Tensor | None) -> torch.Tensor:
        """One decoder-layer tensor; ``w`` None gives the extra (identity) layers' tensor."""
        b = self.big
        attn_width = b.num_heads * b.head_dim
        if part.endswith("layernorm.weight"):
            return self.norm(w)
        shapes = {"q_proj": (attn_width, b.hidden_size), "k_proj": (attn_width, b.hidden_size),
                  "v_proj": (attn_width, b.hidden_size), "o_proj": (b.hidden_size, attn_width),
                  "gate_proj": (b.intermediate_size, b.hidden_size), "up_proj": (b.intermediate_size, b.hidden_size),
                  "down_proj": (b.hidden_size, b.intermediate_size)}
        name = part.split(".")[1]
        rows, cols = shapes[name]
        if w is None:
            return torch.zeros((rows, cols))
        if name in ("q_proj", "k_proj", "v_proj"):
            scale = math.sqrt(self.ratio) if name == "q_proj" else 1.0
            return self._place(w.float() * scale, rows, cols, row_index=self.head_rows)
        if name == "o_proj":
            return self._place(w, rows, cols, col_index=self.head_rows)
        return self._place(w, rows, cols)

    def embeddings(self, w: torch.Tensor) -> torch.Tensor:
        """Token embeddings: small rows in the first dims, zero rows for the padded ids."""
        return self._place(w, self.big.vocab_size, self.big.hidden_size)

    def lm_head(self, w: torch.Tensor) -> torch.Tensor:
        """LM head: padded ids copy the last small row (equal logits; argmax keeps the lower id)."""
        out = self._place(w, self.big.vocab_size, self.big.hidden_size)
        out[w.shape[0]:, : w.shape[1]] = w[-1].float()
        return out

    def to_hidden(self, w: torch.Tensor, hidden_in: bool) -> torch.Tensor:
        """A projector weight writing the LLM's hidden size (and reading it when ``hidden_in``)."""
        cols = self.big.hidden_size if hidden_in else w.shape[1]
        return self._place(w, self.big.hidden_size, cols)

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.big.hidden_size)
        out[: b.shape[0]] = b.float()
        return out


def _key_roles(kind: str, keys: list[str]) -> tuple[str, str, tuple[str, ...]]:
    """(LLM body prefix, LM head key, projector prefixes) for both Video-LLaVA key layouts."""
    if kind == "eventgpt":
        return "model.", "lm_head.weight", ("model.visual_projector.", "model.feature_adaptor.")
    if any(k.startswith("language_model.model.") for k in keys):
        return "language_model.model.", "language_model.lm_head.weight", ("multi_modal_projector.",)
    return "model.language_model.", "lm_head.weight", ("model.multi_modal_projector.",)


def _projector_tensor(widener: LlmWidener, key: str, w: torch.Tensor) -> torch.Tensor:
    """Visual projector / feature adaptor tensors: outputs widened, hidden-size inputs widened too."""
    first_layer = key.endswith((".0.weight", "linear_1.weight"))
    if key.endswith(".bias"):
        return widener.bias(w)
    return widener.to_hidden(w, hidden_in=not first_layer)


def widened_tensors(kind: str, tensors: dict[str, torch.Tensor], widener: LlmWidener,
                    weights_file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the widened checkpoint (float32), in a stable order."""
    body, head, projectors = _key_roles(kind, list(tensors))
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, w in tensors.items():
        if key.startswith(projectors):
            yield key, _projector_tensor(widener, key, w)
        elif key == head:
            yield key, widener.lm_head(w)
        elif key == body + "embed_tokens.weight":
            yield key, widener.embeddings(w)
        elif key == body + "norm.weight":
            yield key, widener.norm(w)
        elif key.startswith(body + "layers."):
            match = _LAYER_KEY.search(key)
            if match is None or match.group(2) not in _LAYER_PARTS:
                raise _fail(weights_file, f"unknown architecture (unexpected LLM weight {key})")
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = w
        elif kind == "eventgpt" and key.startswith(body) and not key.startswith(body + "visual_tower."):
            raise _fail(weights_file, f"unknown architecture (unexpected weight {key})")
        else:
            yield key, w  # vision towers: copied unchanged
    if sorted(layers) != list(range(widener.src.num_layers)):
        raise _fail(weights_file, f"holds layers {sorted(layers)}, config.json says {widener.src.num_layers}")
    for idx in range(widener.big.num_layers):
        for part in _LAYER_PARTS:
            small = layers.get(idx, {}).get(part)
            if idx < widener.src.num_layers and small is None:
                raise _fail(weights_file, f"layer {idx} has no {part}; the checkpoint is incomplete")
            yield f"{body}layers.{idx}.{part}", widener.layer_part(part, small)


def widened_config(config: dict, kind: str, src: LlmShape, plan: WidenPlan, source: Path) -> dict:
    """config.json of the widened checkpoint: the big LLM shape, scaled eps, the visual padding."""
    out = json.loads(json.dumps(config))
    text = text_config(out, kind)
    big = plan.shape
    eps = float(text.get("rms_norm_eps", 1e-6))
    text.update(hidden_size=big.hidden_size, num_hidden_layers=big.num_layers, num_attention_heads=big.num_heads,
                num_key_value_heads=big.num_heads, head_dim=big.head_dim, intermediate_size=big.intermediate_size,
                vocab_size=big.vocab_size, max_position_embeddings=max(big.max_positions, src.max_positions),
                rms_norm_eps=eps * src.hidden_size / big.hidden_size)
    have = visual_token_count(config, kind)
    out["visual_pad_tokens"] = max(0, plan.visual_tokens - have)
    out["answer_vocab_size"] = src.vocab_size  # ids from here on are padding: common.vlm scores them -inf
    out["widened_from"] = {"path": str(source), "shape": asdict(src), "visual_tokens": have}
    return out


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise _fail(folder, "no *.safetensors weights; widen_pair reads safetensors checkpoints only")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, dtype: torch.dtype,
                  shard_bytes: int = SHARD_BYTES) -> int:
    """Save tensors as safetensors shards of at most ``shard_bytes`` (an index when more than one); returns bytes."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            path = folder / f"part-{len(names):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            path.chmod(0o644)
            names.append(list(shard))
            shard, size = {}, 0

    for key, w in tensors:
        w = w.to(dtype if w.dtype.is_floating_point else w.dtype).contiguous()
        nbytes = w.numel() * w.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[key], size, total = w, size + nbytes, total + nbytes
    flush()
    if len(names) == 1:
        (folder / "part-00000.safetensors").rename(folder / "model.safetensors")
        return total
    weight_map = {}
    for i, keys in enumerate(names, start=1):
        final = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        (folder / f"part-{i - 1:05d}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


@dataclass
class Prepared:
    """A source checkpoint checked and planned, before anything is written."""

    kind: str
    source: Path
    config: dict
    src: LlmShape
    plan: WidenPlan


def prepare(kind: str, source: str | Path, shape_name: str) -> Prepared:
    """Read and check one source checkpoint against the target shape (raises DataError, writes nothing)."""
    folder = Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _fail(config_file, "missing; pass a checkpoint folder with config.json and *.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(config_file, f"unreadable JSON ({exc})") from exc
    src = read_shape(config, kind, config_file)
    plan = plan_for(kind, shape_name, src, visual_token_count(config, kind))
    check_fits(src, plan.shape, config_file)
    if int(config.get("visual_pad_tokens", 0) or 0):
        raise _fail(config_file, "is already widened (visual_pad_tokens is set); widen the trained checkpoint")
    return Prepared(kind, folder, config, src, plan)


def source_fingerprint(folder: Path) -> str:
    """sha256 over a checkpoint's config.json and weight files (tells a retrained checkpoint in the same folder)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_widened(prep: Prepared, folder: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write one widened checkpoint into ``folder`` (config, weights, every other file copied)."""
    folder.mkdir(parents=True)
    widener = LlmWidener(prep.src, prep.plan.shape)
    tensors = load_tensors(prep.source)
    weights_file = next(iter(sorted(prep.source.glob("*.safetensors"))))
    nbytes = write_sharded(widened_tensors(prep.kind, tensors, widener, weights_file), folder, dtype, shard_bytes)
    config = widened_config(prep.config, prep.kind, prep.src, prep.plan, prep.source)
    config["dtype"] = str(dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in prep.source.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy2(f, folder / f.name)
    return {"source": str(prep.source), "source_fingerprint": source_fingerprint(prep.source), "path": str(folder),
            "source_shape": asdict(prep.src),
            "shape": asdict(prep.plan.shape), "visual_pad_tokens": config["visual_pad_tokens"],
            "weight_bytes": nbytes}


def widen_pair(output_dir: str | Path, eventgpt_path: str | Path, videollava_path: str | Path,
               shape_name: str = "7b", dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Widen both checkpoints into ``output_dir``/eventgpt and /videollava; all or nothing.

    Both sources are checked before anything is written; the pair is written into a temporary
    folder beside ``output_dir`` and moved into place at the end.
    """
    out = Path(output_dir)
    preps = [prepare("eventgpt", eventgpt_path, shape_name), prepare("videollava", videollava_path, shape_name)]
    for kind in KINDS:
        if (out / kind).exists():
            raise DataError(f"{out / kind}: already exists; pass another --output_dir or remove it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".widen-", dir=out))
    try:
        summary: dict[str, Any] = {"shape": shape_name, "dtype": str(dtype).replace("torch.", "")}
        for prep in preps:
            summary[prep.kind] = write_widened(prep, tmp / prep.kind, dtype)
        for kind in KINDS:
            (tmp / kind).rename(out / kind)
            summary[kind]["path"] = str(out / kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "widen_pair.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def compare_answers(sources: dict[str, Path], widened: dict[str, Path], dataset_dir: str | Path,
                    num_clips: int = 3, max_new_tokens: int = 48, device: str = "cpu") -> dict[str, Any]:
    """Greedy answers of each source model and its widened twin on ``num_clips`` clips (fp32): how many match.

    Uses the toolkit's own path (``load_vlm``, ``prefill``, ``autoregressive_generate``), each clip
    with its own question (the benchmark question in the synthetic splits).
    """
    from common.data import ClipDataset
    from common.models.loader import load_vlm
    from common.speculative import autoregressive_generate

    dataset = ClipDataset(dataset_dir)
    samples = [dataset[i] for i in range(min(num_clips, len(dataset)))]
    report: dict[str, Any] = {"num_clips": len(samples), "max_new_tokens": max_new_tokens}
    for kind in KINDS:
        pair = [load_vlm(kind, p, quant="fp32", device=device) for p in (sources[kind], widened[kind])]
        answers: list[list[list[int]]] = [[], []]
        for sample in samples:
            for model, out in zip(pair, answers, strict=True):
                state = model.prefill(model.encode(sample), sample.question)
                out.append(autoregressive_generate(model, state, max_new_tokens=max_new_tokens).tokens)
        report[kind] = {"match": sum(a == b for a, b in zip(*answers, strict=True)), "total": len(samples),
                        "mismatched_ids": [s.id for s, a, b in zip(samples, *answers, strict=True) if a != b]}
        del pair
    return report
