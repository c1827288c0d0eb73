"""Visual token compression baseline: the target itself, with its video tokens pooled, as a cheaper draft.

Video-LLaVA puts 8 x 257 = 2056 visual tokens (per frame: CLS + a 16 x 16 patch grid) into its
prompt. :class:`PooledVideoLlava` is the SAME model (it shares every module of the target, no
weights are copied) whose visual tokens are average-pooled per frame over ``pool x pool``
patch windows, keeping each frame's CLS token: ``--pool 2`` gives 8 x (64 + 1) = 520 tokens.
It has its own KV cache / decoding state (and its own CUDA graphs if enabled), so it can
prefill and draft while the target holds another state: use it as the draft model of a
``ModelDrafter`` (same vocabulary, so every target id can be fed and proposed), or as the
draft lane of ``run_parallel``.

    pooled = PooledVideoLlava(target, pool=2)
    state = pooled.prefill(pooled.pool_visual(target_visual), question)   # or prefill_sample(pooled, sample)
    drafter = pooled_drafter(pooled, state, target)

Pooling happens in the LLM's embedding space (after the projector), so the vision tower and
projector run once and their output can be shared with the target (:meth:`pool_visual`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from common.speculative import ModelDrafter
from common.timing import sync_current_stream
from common.vlm import VisionLanguageModel, VisualInput

__all__ = ["PooledVideoLlava", "pool_video_tokens", "pooled_drafter", "NUM_FRAMES"]

NUM_FRAMES = 8


def pool_video_tokens(embeds: torch.Tensor, pool: int, num_frames: int = NUM_FRAMES, keep_cls: bool = True,
                      ) -> torch.Tensor:
    """(F x (1 + g*g), H) frame tokens -> (F x (1 + (g/pool)^2), H): per frame CLS kept, patches avg-pooled.

    ``g`` is the patch grid side (16 for Video-LLaVA); ``pool`` must divide it (pool 1 = unchanged).
    Grids that ``pool`` does not divide are pooled with ``ceil_mode`` (edge windows are smaller).
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    total, hidden = embeds.shape
    if total % num_frames:
        raise ValueError(f"{total} visual tokens are not {num_frames} frames of equal size")
    per_frame = total // num_frames
    grid = math.isqrt(per_frame - 1)
    if grid * grid != per_frame - 1:
        raise ValueError(f"{per_frame} tokens per frame are not CLS + a square patch grid")
    if pool == 1:
        return embeds
    frames = embeds.reshape(num_frames, per_frame, hidden)
    cls, patches = frames[:, :1], frames[:, 1:]
    grid_t = patches.reshape(num_frames, grid, grid, hidden).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(grid_t, kernel_size=pool, stride=pool, ceil_mode=True)
    pooled = pooled.permute(0, 2, 3, 1).reshape(num_frames, -1, hidden).to(embeds.dtype)
    parts = [cls, pooled] if keep_cls else [pooled]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


class PooledVideoLlava(VisionLanguageModel):
    """The target Video-LLaVA with ``pool x pool`` average-pooled video tokens (shared modules, own state)."""

    def __init__(self, target: Any, pool: int = 2, keep_cls: bool = True):
        if pool < 1:
            raise ValueError(f"--pool must be >= 1, got {pool}")
        super().__init__(target.model, target.runner.language_model, target.runner.lm_head, target.tokenizer,
                         base_vocab_size=target.base_vocab_size)
        self.target = target
        self.pool = int(pool)
        self.keep_cls = keep_cls
        self.name = f"{target.name}_pool{self.pool}"
        self.decode_room = target.decode_room

    # the visual path: the target's, then pooling
    def build_prompt(self, question: str) -> str:
        return self.target.build_prompt(question)

    def load_visual(self, sample: Any) -> Any:
        return self.target.load_visual(sample)

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self.target.preprocess(raw)

    def encode_pixels_eager(self, pixels: torch.Tensor) -> VisualInput:
        return self.pool_visual(self.target.encode_pixels(pixels))

    def pool_visual(self, visual: VisualInput) -> VisualInput:
        """The target's visual tokens pooled (reuse the target's encoding: no second vision pass)."""
        return VisualInput(pool_video_tokens(visual.embeds, self.pool, keep_cls=self.keep_cls))

    def prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor:
        return self.target.prompt_embeds(visual, question)

    def build_prompt_ids(self, question: str, num_visual_tokens: int) -> list[int]:
        return self.target.prompt_ids(question, num_visual_tokens)

    @property
    def eos_token_id(self) -> int:
        return self.target.eos_token_id


def pooled_drafter(pooled: PooledVideoLlava, state: Any, target: Any, *, sync: Any = None,
                   name: str | None = None) -> ModelDrafter:
    """A ``ModelDrafter`` over the pooled self-draft: same vocabulary as the target, so no id is masked or mapped."""
    return ModelDrafter(pooled, state, vocab_limit=int(target.vocab_size), target_vocab_size=int(target.vocab_size),
                        stop_token_ids=[target.eos_token_id], name=name or f"pooled_x{pooled.pool}", sync=sync,
                        unknown_token_id=getattr(target.tokenizer, "unk_token_id", 0) or 0)


class PooledFactory:
    """Per-sample builder of :func:`pooled_drafter` (the factory protocol of ``common.speculative``)."""

    hidden_layers: tuple[int, ...] = ()

    def __init__(self, pooled: PooledVideoLlava):
        self.pooled = pooled
        self.kind = pooled.name

    def engine_target(self, target: Any) -> Any:
        """The target verifies itself."""
        return target

    def __call__(self, draft: Any, draft_state: Any, target: Any) -> ModelDrafter:
        return pooled_drafter(self.pooled, draft_state, target, sync=partial(sync_current_stream, draft.device))
