"""Widen the trained drafters of a small pair so that they propose the same tokens on its widened twin.

``common.models.widen`` embeds the small pair in the twin exactly: every hidden state of the twin
(the residual after any small layer, and the final normed state that feeds the LM head) is the
small model's state in the first ``d_small`` dims and exactly zero in the others (the norm weights
and eps are scaled so that the norms see the same values); layer ``i`` of the small model is layer
``i`` of the twin (extra layers come after and are the identity); the final normed state stays
layer -1; embeddings and LM-head rows of the small vocabulary are the small ones padded with zeros.
Each drafter kind is widened to read and write that embedding:

- EAGLE head (one LLaMA decoder layer + ``fc``): widened like a twin layer (``LlmWidener``), to the
  twin target's decoder-layer shape, so it costs what a head over 4096-wide features costs;
  ``fc``'s two input halves move to ``[0:h]`` and ``[H:H+h]``.
- hidden adapters L1-L5 (LayerNorm inside, which zero padding would change): the same weights,
  marked widened in their config (``widened_in/out``): they read the first ``hidden_in`` dims of
  the twin draft's states and write the first ``hidden_out`` dims (``WidenedAdapter``). Exact; their
  own compute stays the small adapter's (at 7B an L1 would be about 0.3 % of a target step).
- TokenAdapter (tokens only): its vocabulary rows follow the twin's padded vocabularies (new ids
  read as its unk row, as before; its bos/unk/none rows move up), so it loads without a warning.

Layers named by negative index move to the twin's positive index (``-1`` stays ``-1``).
What cannot be widened exactly is refused with one line naming the file and the reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from common.errors import DataError
from common.models.widen import LlmShape, LlmWidener, Prepared, check_fits, prepare

__all__ = ["DrafterSources", "widened_layer", "widen_eagle_head", "widen_hidden_adapter", "widen_token_adapter",
           "prepare_drafters", "write_drafters", "widen_drafters", "DRAFTERS_DIR"]

DRAFTERS_DIR = "drafters"


@dataclass(frozen=True)
class DrafterSources:
    """Trained drafters of the small pair to widen (any subset)."""

    eagle_head: str | None = None
    hidden_adapters: tuple[str, ...] = ()
    token_adapter: str | None = None

    def __bool__(self) -> bool:
        return bool(self.eagle_head or self.hidden_adapters or self.token_adapter)


@dataclass
class _Job:
    """One drafter checked and widened in memory, written later by :func:`write_drafters`."""

    kind: str  # eagle_head | hidden_adapter | token_adapter
    source: str
    name: str
    write: Any  # write(path) -> None
    info: dict[str, Any] = field(default_factory=dict)


def widened_layer(layer: int, num_layers: int, file: Path | str) -> int:
    """The twin's index of a small model's hidden layer (0 embeddings, i after layer i, -1 final normed)."""
    idx = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= idx <= num_layers:
        raise DataError(f"{file}: hidden layer {layer} is out of range for the {num_layers}-layer model it was "
                        "trained on; it cannot be widened")
    return -1 if idx == num_layers else idx


def _shape_of(src: LlmShape, layers: int = 1) -> LlmShape:
    return replace(src, num_layers=layers, vocab_size=0, max_positions=0)


def widen_eagle_head(path: str | Path, target: Prepared) -> tuple[Any, _Job]:
    """The EAGLE head at ``path`` widened to one decoder layer of ``target``'s twin (not yet written)."""
    from common.drafters.eagle_head import (
        CONFIG_NAME,
        EagleHead,
        EagleHeadConfig,
        resolve_head_dir,
        save_eagle_head,
    )
    from common.models.widen import load_tensors

    try:
        folder = resolve_head_dir(path)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    config_file = folder / CONFIG_NAME
    try:
        c = EagleHeadConfig.from_dict(json.loads(config_file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{config_file}: not an EAGLE head config ({exc}); it cannot be widened") from None
    src, twin = target.src, target.plan.shape
    if c.hidden_size != src.hidden_size or c.target_vocab_size not in (0, src.vocab_size) \
            or c.target_num_layers not in (0, src.num_layers):
        raise DataError(f"{config_file}: the head was trained for a {c.hidden_size}-wide target with "
                        f"{c.target_vocab_size} ids, not for {target.source} ({src.hidden_size} wide, "
                        f"{src.vocab_size} ids); pass the target it was trained on")
    small = LlmShape(c.hidden_size, 1, c.num_heads, c.hidden_size // c.num_heads, c.intermediate_size, 0, 0)
    big = _shape_of(twin)
    check_fits(small, big, config_file)
    widener = LlmWidener(small, big)
    tensors = load_tensors(folder)
    h, hb = small.hidden_size, big.hidden_size
    out: dict[str, torch.Tensor] = {}
    for key, w in tensors.items():
        name = key.split(".")[0]
        if name in ("input_norm", "post_norm"):
            out[key] = widener.norm(w)
        elif name == "fc" and key.endswith("bias"):
            out[key] = widener.bias(w)
        elif name == "fc":
            fc = torch.zeros((hb, 2 * hb))
            fc[:h, :h], fc[:h, hb:hb + h] = w[:, :h].float(), w[:, h:].float()
            out[key] = fc
        elif name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[key] = widener.layer_part(f"self_attn.{key}", w)
        elif name in ("gate_proj", "up_proj", "down_proj"):
            out[key] = widener.layer_part(f"mlp.{key}", w)
        else:
            raise DataError(f"{folder}: unknown EAGLE head weight {key}; it cannot be widened")
    config = replace(c, hidden_size=hb, num_heads=big.num_heads, intermediate_size=big.intermediate_size,
                     feature_layer=widened_layer(c.feature_layer, src.num_layers, config_file),
                     rms_norm_eps=c.rms_norm_eps * h / hb, target_vocab_size=twin.vocab_size,
                     target_num_layers=twin.num_layers,
                     extra={**c.extra, "widened_from": {"path": str(folder), "hidden_size": h}})
    with torch.device("meta"):
        head = EagleHead(config)
    head.load_state_dict(out, strict=True, assign=True)
    job = _Job("eagle_head", str(folder), "eagle_head", lambda dst: save_eagle_head(head, dst),
               {"hidden_size": hb, "feature_layer": config.feature_layer})
    return head, job


def widen_hidden_adapter(path: str | Path, draft: Prepared, target: Prepared) -> tuple[Any, _Job]:
    """The L1-L5 adapter at ``path`` marked to run on the twins of ``draft`` -> ``target`` (not yet written)."""
    from common.drafters.hidden_adapter import WidenedAdapter, load_any_adapter, save_adapter

    try:
        adapter = load_any_adapter(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a hidden adapter checkpoint ({exc})") from None
    file = Path(adapter.checkpoint_path)
    c = adapter.config
    if isinstance(adapter, WidenedAdapter):
        raise DataError(f"{file}: is already widened; widen the adapter trained on the small pair")
    if (c.hidden_in, c.hidden_out) != (draft.src.hidden_size, target.src.hidden_size):
        raise DataError(f"{file}: maps {c.hidden_in} -> {c.hidden_out} but the pair is {draft.src.hidden_size} -> "
                        f"{target.src.hidden_size}; pass the pair it was trained on")
    meta = dict(adapter.meta)
    meta["input_layer"] = widened_layer(int(meta.get("input_layer", -1)), draft.src.num_layers, file)
    if "target_layer" in meta:
        meta["target_layer"] = widened_layer(int(meta["target_layer"]), target.src.num_layers, file)
    meta["widened_from"] = str(file)
    adapter.config = replace(c, widened_in=draft.plan.shape.hidden_size, widened_out=target.plan.shape.hidden_size)
    wide = WidenedAdapter(adapter)
    wide.meta = meta
    job = _Job("hidden_adapter", str(file), f"L{c.level}", lambda dst: save_adapter(wide, dst, meta),
               {"level": c.level, "input_layer": meta["input_layer"]})
    return wide, job


def widen_token_adapter(path: str | Path, draft: Prepared, target: Prepared) -> tuple[Any, _Job]:
    """The TokenAdapter at ``path`` with its vocabulary rows laid out for the twin's padded vocabularies."""
    from common.drafters.token_adapter import CONFIG_NAME, TokenAdapter

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() and (folder / "checkpoint" / CONFIG_NAME).is_file():
        folder = folder / "checkpoint"
    try:
        small = TokenAdapter.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: not a TokenAdapter checkpoint ({exc})") from None
    c = small.config
    if (c.draft_vocab_size, c.target_vocab_size) != (draft.src.vocab_size, target.src.vocab_size):
        raise DataError(f"{folder / CONFIG_NAME}: trained for vocabularies {c.draft_vocab_size} -> "
                        f"{c.target_vocab_size}, the pair has {draft.src.vocab_size} -> {target.src.vocab_size}; "
                        "pass the pair it was trained on")
    config = replace(c, draft_vocab_size=draft.plan.shape.vocab_size, target_vocab_size=target.plan.shape.vocab_size)
    wide = TokenAdapter(config)
    state = small.state_dict()
    old = state["tok.weight"]
    new = old[c.unk_id].repeat(config.in_vocab + 3, 1)  # ids the small adapter read as unk still do
    new[: c.in_vocab] = old[: c.in_vocab]
    new[config.bos_id:] = old[c.bos_id:]  # bos, unk, none
    state["tok.weight"] = new
    wide.load_state_dict(state)
    wide.eval()
    extra = {"widened_from": str(folder)}
    job = _Job("token_adapter", str(folder), "token_adapter", lambda dst: wide.save_pretrained(dst, extra=extra),
               {"in_vocab": config.in_vocab})
    return wide, job


def prepare_drafters(sources: DrafterSources, draft: Prepared, target: Prepared) -> list[_Job]:
    """Read, check and widen every given drafter in memory (raises DataError; writes nothing)."""
    jobs: list[_Job] = []
    if sources.eagle_head:
        jobs.append(widen_eagle_head(sources.eagle_head, target)[1])
    for path in sources.hidden_adapters:
        jobs.append(widen_hidden_adapter(path, draft, target)[1])
    if sources.token_adapter:
        jobs.append(widen_token_adapter(sources.token_adapter, draft, target)[1])
    seen: dict[str, int] = {}
    for job in jobs:  # two adapters of one level: L1, L1_2
        seen[job.name] = seen.get(job.name, 0) + 1
        if seen[job.name] > 1:
            job.name = f"{job.name}_{seen[job.name]}"
    return jobs


def write_drafters(jobs: list[_Job], output_dir: str | Path) -> dict[str, Any]:
    """Write the widened drafters into ``output_dir``/drafters (all or nothing); returns paths per kind.

    ``eagle_head``: folder; ``hidden_adapter``: list of ``<level>.safetensors`` files; ``token_adapter``: folder.
    """
    out = Path(output_dir) / DRAFTERS_DIR
    if out.exists():
        raise DataError(f"{out}: already exists; pass another --output_dir or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".drafters-", dir=out.parent))
    summary: dict[str, Any] = {"hidden_adapter": []}
    try:
        for job in jobs:
            rel = f"hidden_adapter/{job.name}.safetensors" if job.kind == "hidden_adapter" else job.name
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            job.write(tmp / rel)
            entry = {"source": job.source, "path": str(out / rel), **job.info}
            if job.kind == "hidden_adapter":
                summary["hidden_adapter"].append(entry)
            else:
                summary[job.kind] = entry
        (tmp / "drafters.json").write_text(json.dumps(summary, indent=2) + "\n")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def widen_drafters(output_dir: str | Path, sources: DrafterSources, eventgpt_path: str | Path,
                   videollava_path: str | Path, shape_name: str = "7b") -> dict[str, Any]:
    """Widen ``sources`` (trained on the pair at ``eventgpt_path``/``videollava_path``) into ``output_dir``/drafters."""
    draft, target = prepare("eventgpt", eventgpt_path, shape_name), prepare("videollava", videollava_path, shape_name)
    return write_drafters(prepare_drafters(sources, draft, target), output_dir)
