"""The uniform interface both vision-language models implement.

Timing, speculation, extraction and training only talk to this surface, so they never
special-case a model:

- ``load_visual(sample)``   stage 1: read the clip's visual data from disk (frames / event images)
- ``preprocess(raw)``       stage 2: resize/crop/normalise into pixel tensors on the device
- ``encode_pixels(pixels)`` stage 3: vision tower + projector (+ adaptor/pooling) -> ``VisualInput``
  (subclasses write ``encode_pixels_eager``; graph replays after ``enable_vision_graphs``)
- ``encode(sample)``        stages 1-3 together
- ``prefill(visual, question, hidden_layers)`` stage 4: the prompt through the LLM -> ``DecodeState``
- ``forward(state, token_ids, hidden_layers)`` 1..k new tokens -> float32 logits (k, V); decode
  and verification are the same call
- ``truncate(state, length)`` roll the KV cache back after a rejection
- ``lm_head``, ``embed_tokens``, ``tokenizer``, ``hidden_size``, ``device``, ``dtype``,
  ``build_prompt(question)``, ``base_vocab_size`` (ids below it are the shared base vocabulary)

Decode routing (CUDA graphs, fixed step, kernels) lives in ``vlm.decoding`` (common.models.decoding);
the batched passes ``teacher_forced`` / ``generate_greedy_batch`` in common.models.batch_passes.

Hidden-state layer indices: 0 = token embeddings, i = output of decoder layer i,
-1 (= num_layers) = the final normed state that feeds the LM head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.models import batch_passes
from common.models.batch_passes import TeacherForced
from common.models.decoder import CudaGraphDecoder, KVCache, LlamaRunner, VocabLimitedHead
from common.models.decoding import Decoding
from common.models.graphed_prefill import GraphedPrefill
from common.models.graphed_vision import GraphedVisionEncoder
from common.models.greedy_batch import GreedyBatch
from common.tree import compact_cache

# Room reserved in a fresh KV cache beyond the prompt (it grows by doubling past this).
DEFAULT_DECODE_ROOM = 128


@dataclass
class VisualInput:
    """Visual embeddings ready to be placed into the LLM prompt."""

    embeds: torch.Tensor  # (num_tokens, hidden) in the LLM's dtype, on its device

    @property
    def num_tokens(self) -> int:
        """Number of visual tokens the prompt will hold."""
        return int(self.embeds.shape[0])


@dataclass
class DecodeState:
    """A model's decoding state: its KV cache and the logits for the next token."""

    cache: KVCache
    logits: torch.Tensor  # (V,) float32: the distribution after the last cached position
    prompt_length: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # of the last forward, layer -> (k, H)

    @property
    def length(self) -> int:
        """Positions held in the KV cache (prompt + fed tokens)."""
        return self.cache.length

    @property
    def num_generated(self) -> int:
        """Tokens fed after the prompt."""
        return self.cache.length - self.prompt_length


class VisionLanguageModel(ABC):
    """A LLaVA-style model behind the uniform interface; subclasses supply the visual path."""

    name: str = "vlm"

    def __init__(self, model: nn.Module, language_model: nn.Module, lm_head: nn.Module, tokenizer: Any,
                 base_vocab_size: int):
        self.model = model
        self.tokenizer = tokenizer
        # a widened twin's masked visual padding (common.models.widen): positions before the prompt
        self.visual_pad_tokens = int(getattr(model.config, "visual_pad_tokens", 0) or 0)
        answer_vocab = int(getattr(model.config, "answer_vocab_size", 0) or 0)
        if 0 < answer_vocab < int(lm_head.weight.shape[0]):  # a twin's padded ids are never produced
            lm_head = VocabLimitedHead(lm_head, answer_vocab)
        self.runner = LlamaRunner(language_model, lm_head, masked_prefix=self.visual_pad_tokens)
        self.base_vocab_size = int(base_vocab_size)
        self.decode_room = DEFAULT_DECODE_ROOM
        self.decoding = Decoding(self.runner)  # graphs, fixed step, kernels switch: the decode routing
        if self.device.type == "cuda":  # Triton prefill kernels (the nf4 few-row kernel is opt-in: on the H200
            self.runner.use_prefill_kernels(True)  # its 4-bit verify measured 3.17x a decode, bitsandbytes' 2.51x)
        self.vision_graphs: GraphedVisionEncoder | None = None
        self.prefill_graphs: GraphedPrefill | None = None
        self._parked_prefill: GraphedPrefill | None = None  # kept by disable_prefill_graphs for reuse
        self._prompt_memo: dict[tuple, tuple[int, ...]] | None = None

    # ----- fast decode -----
    def enable_cuda_graphs(self, max_length: int, step_sizes: Sequence[int] = (1,), compile: bool = False,
                           fixed_step: int | None = None, fuse: bool = True, kernels: bool | None = None,
                           tree_step: int | None = None) -> None:
        """Decode with a static KV cache of ``max_length`` positions and CUDA-graph replays.

        ``step_sizes`` are the token counts captured (1 for decoding, gamma + 1 for verification;
        smaller steps are padded up); ``compile`` runs the step through ``torch.compile`` before
        capture (fused element-wise kernels; slower start). ``fixed_step`` makes every forward
        run as padded steps of exactly that many tokens (see ``use_fixed_step``); ``fuse`` concatenates
        q/k/v and gate/up weights and uses a fused RMSNorm (unquantized models only); ``kernels`` runs the
        captured step through the Triton kernels of ``common.models.kernels`` where they apply (see
        ``LlamaRunner.use_kernels``; default: on unless ``compile``); ``tree_step`` also captures the graph of
        a draft tree's verify of that many rows (``--tree_tokens``; kernels only). Prefill stays eager. Only one decoding state of this
        model is live at a time (each prefill reuses the static cache).
        """
        self.decoding.enable_cuda_graphs(max_length, self.dtype, self.device, step_sizes, compile=compile,
                                         fixed_step=fixed_step, fuse=fuse, kernels=kernels, tree_step=tree_step)

    def use_fixed_step(self, size: int | None) -> None:
        """Route every decode/verify forward through padded ``size``-token graph steps (None: fastest fit).

        With a fixed step, the target's plain greedy output and its speculative output go through
        identical kernels, so they agree bitwise in bf16/4-bit too; see ``CudaGraphDecoder.step_fixed``.
        """
        self.decoding.use_fixed_step(size)

    def disable_cuda_graphs(self) -> None:
        """Back to eager decoding with a fresh cache per prefill (and an eager vision path)."""
        self.decoding.disable_cuda_graphs()
        self.vision_graphs = None
        self.prefill_graphs = self._parked_prefill = None

    @property
    def graphs(self) -> CudaGraphDecoder | None:
        """The captured decode graphs (``decoding.graphs``), None when decoding eagerly."""
        return self.decoding.graphs

    @property
    def fixed_step(self) -> int | None:
        """The padded step every graph forward runs as (``decoding.fixed_step``), None: the fastest fit."""
        return self.decoding.fixed_step

    def enable_vision_graphs(self) -> None:
        """Run ``encode_pixels`` as CUDA-graph replays (one capture per pixel shape; same kernels as eager).

        Cuts the host time of the vision tower, which matters when two models are driven from two
        threads at once (``common.parallel``). Undone by ``disable_cuda_graphs``.
        """
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if self.vision_graphs is None:
            self.vision_graphs = GraphedVisionEncoder(self.encode_pixels_eager, self.device)

    def enable_prefill_graphs(self, max_lengths: int = 8) -> None:
        """Run the LLM prefill as CUDA-graph replays (one capture per prompt length, up to ``max_lengths``).

        Needs ``enable_cuda_graphs`` (the graph writes the static cache); one launch instead of ~500, so
        a model prefilling beside another one's thread does not wait on the interpreter lock
        (``common.parallel``). Undone by ``disable_cuda_graphs``.
        """
        if self.device.type != "cuda" or self.graphs is None:
            raise ValueError("prefill graphs need the model on a CUDA device with enable_cuda_graphs on")
        if self.prefill_graphs is None:
            self.prefill_graphs = self._parked_prefill or GraphedPrefill(self.runner, max_lengths)

    def disable_prefill_graphs(self) -> None:
        """Back to the eager prefill (decode graphs stay on); ``enable_prefill_graphs`` reuses the captures."""
        self._parked_prefill = self.prefill_graphs or self._parked_prefill
        self.prefill_graphs = None

    def memoize_prompts(self) -> None:
        """Remember :meth:`prompt_ids` per arguments (a pure function of the question; few questions exist)."""
        if self._prompt_memo is None:
            self._prompt_memo = {}

    def prompt_ids(self, question: str, *args: Any) -> list[int]:
        """The prompt's token ids (``build_prompt_ids``), from the memo after :meth:`memoize_prompts`."""
        if self._prompt_memo is None:
            return self.build_prompt_ids(question, *args)
        key = (question, *args)
        if key not in self._prompt_memo:
            self._prompt_memo[key] = tuple(self.build_prompt_ids(question, *args))
        return list(self._prompt_memo[key])

    # ----- properties every consumer may rely on -----
    @property
    def lm_head(self) -> nn.Module:
        """The output projection hidden -> vocabulary logits."""
        return self.runner.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        """The input token embedding table."""
        return self.runner.language_model.embed_tokens

    @property
    def hidden_size(self) -> int:
        return self.runner.shape.hidden_size

    @property
    def num_layers(self) -> int:
        return self.runner.shape.num_layers

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (may exceed the tokenizer, e.g. Video-LLaVA pads to 32064)."""
        return int(self.lm_head.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the LLM (embeddings' dtype)."""
        return self.embed_tokens.weight.dtype

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ----- the visual path: model specific -----
    @abstractmethod
    def build_prompt(self, question: str) -> str:
        """The full prompt text around the question, with the model's visual placeholder."""

    @abstractmethod
    def load_visual(self, sample: Any) -> Any:
        """Stage 1: read the sample's visual data from disk."""

    @abstractmethod
    def preprocess(self, raw: Any) -> torch.Tensor:
        """Stage 2: pixel tensors on the device."""

    def build_prompt_ids(self, question: str, *args: Any) -> list[int]:
        """The prompt's token ids, with the model's visual placeholder(s) (model specific)."""
        raise NotImplementedError(f"{type(self).__name__} builds its prompt embeddings without prompt ids")

    def encode_pixels_eager(self, pixels: torch.Tensor) -> VisualInput:
        """Stage 3 run eagerly: vision tower and projector (model specific)."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_pixels_eager")

    def encode_pixels(self, pixels: torch.Tensor) -> VisualInput:
        """Stage 3: vision tower and projector (CUDA-graph replays after ``enable_vision_graphs``)."""
        if self.vision_graphs is not None:
            return self.vision_graphs(pixels)
        return self.encode_pixels_eager(pixels)

    @abstractmethod
    def prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor:
        """The prompt's input embeddings (T, H) with the visual tokens in place."""

    def padded_prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor:
        """``prompt_embeds`` preceded by the ``visual_pad_tokens`` masked positions (zero embeddings)."""
        embeds = self.prompt_embeds(visual, question)
        if not self.visual_pad_tokens:
            return embeds
        return torch.cat([embeds.new_zeros((self.visual_pad_tokens, embeds.shape[1])), embeds])

    def encode(self, sample: Any) -> VisualInput:
        """Stages 1-3: sample on disk -> visual embeddings."""
        return self.encode_pixels(self.preprocess(self.load_visual(sample)))

    # ----- the LLM path: shared -----
    @torch.no_grad()
    def prefill(self, visual: VisualInput, question: str, hidden_layers: Sequence[int] = ()) -> DecodeState:
        """Stage 4: run the prompt through the LLM into a fresh KV cache."""
        embeds = self.padded_prompt_embeds(visual, question)
        cache = self.decoding.new_cache(embeds.shape[0], self.decode_room, self.dtype, self.device)
        fast = None
        if self.prefill_graphs is not None and self.graphs is not None and cache is self.graphs.cache:
            fast = self.prefill_graphs(embeds, cache, hidden_layers)
        logits, hidden = fast if fast is not None else self.runner.run(embeds, cache, hidden_layers, all_logits=False)
        return DecodeState(cache=cache, logits=logits[-1], prompt_length=embeds.shape[0], hidden=hidden)

    @torch.no_grad()
    def forward(self, state: DecodeState, token_ids: Sequence[int] | torch.Tensor,
                hidden_layers: Sequence[int] = (), *, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed 1..k tokens; return their float32 logits (k, V) and advance ``state``.

        ``attn_mask`` (boolean (k, length + k)) and ``position_ids`` (k,) verify a draft tree
        (common.tree): a tree graph replay on the Triton kernels (bitwise the fixed-step decode; see
        ``Decoding.step``), else eagerly, also over the graphs' static cache.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("forward needs at least one token")
        logits, hidden = self.decoding.step(state.cache, self.embed_tokens(ids), hidden_layers,
                                            attn_mask=attn_mask, position_ids=position_ids)
        state.logits = logits[-1]
        state.hidden = hidden
        return logits

    def truncate(self, state: DecodeState, length: int) -> None:
        """Roll the KV cache back to ``length`` positions (not below the prompt).

        ``state.logits`` is no longer valid afterwards: the caller feeds the next token.
        """
        if length < state.prompt_length:
            raise ValueError(f"cannot truncate into the prompt ({length} < {state.prompt_length})")
        state.cache.truncate(length)

    def compact(self, state: DecodeState, start: int, keep: Sequence[int]) -> None:
        """Keep the positions ``start + keep[i]`` at ``start + i`` and drop the rest (a verified tree's path)."""
        if start < state.prompt_length:
            raise ValueError(f"cannot compact into the prompt ({start} < {state.prompt_length})")
        compact_cache(state.cache.keys, state.cache.values, start, keep)
        state.cache.truncate(start + len(keep))

    def teacher_forced(self, visuals: Sequence[VisualInput], questions: Sequence[str],
                       answers: Sequence[Sequence[int]], hidden_layers: Sequence[int] = (),
                       logits: bool = True) -> TeacherForced:
        """One batched forward over prompt + answer per sample; see ``common.models.batch_passes.teacher_forced``."""
        return batch_passes.teacher_forced(self, visuals, questions, answers, hidden_layers, logits)

    def generate_greedy_batch(self, visuals: Sequence[VisualInput], questions: Sequence[str],
                              max_new_tokens: int, hidden_layers: Sequence[int] = ()) -> GreedyBatch:
        """Greedy answers decoded together; see ``common.models.batch_passes.generate_greedy_batch``."""
        return batch_passes.generate_greedy_batch(self, visuals, questions, max_new_tokens, hidden_layers)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (for answers and targets)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
