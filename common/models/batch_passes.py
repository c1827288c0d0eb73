"""Batched passes of a ``VisionLanguageModel`` over several samples at once.

- ``teacher_forced``: one padded forward over prompt + answer per sample (no KV cache; training and alignment)
- ``generate_greedy_batch``: greedy answers of several samples decoded together (feature extraction)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from common.models.decoder import LlamaRunner
from common.models.decoding import Decoding
from common.models.greedy_batch import GreedyBatch

# A visual input is a ``common.vlm.VisualInput``; this module only hands it to ``padded_prompt_embeds``
# (common.vlm imports this module, so it is not imported back).
VisualInput = Any


class VisionLanguageModel(Protocol):
    """The part of ``common.vlm.VisionLanguageModel`` the batched passes use."""

    runner: LlamaRunner
    decoding: Decoding
    visual_pad_tokens: int

    @property
    def device(self) -> torch.device: ...
    @property
    def embed_tokens(self) -> nn.Module: ...
    @property
    def lm_head(self) -> nn.Module: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    def padded_prompt_embeds(self, visual: VisualInput, question: str) -> torch.Tensor: ...


@dataclass
class TeacherForced:
    """Outputs of ``teacher_forced``: per sample, rows aligned with the answer tokens."""

    spans: list[tuple[int, int]]
    logits: list[torch.Tensor] = field(default_factory=list)  # (len_i, V) float32
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(len_i, H)]


def prefix_mask(runner: LlamaRunner, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal, padding keys hidden, the masked visual prefix hidden from later rows."""
    pos = torch.arange(valid.shape[1], device=valid.device)
    seen = runner.visible(pos[None, :], pos[:, None])[None] & valid[:, None, :].bool()
    return torch.zeros(seen.shape, dtype=dtype, device=valid.device).masked_fill(
        ~seen, torch.finfo(dtype).min)[:, None]


def _padded_batch(vlm: VisionLanguageModel, visuals: Sequence[VisualInput], questions: Sequence[str],
                  answers: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Prompt + answer embeddings right-padded into (B, T, H), their attention mask and the answer spans."""
    seqs, spans = [], []
    for visual, question, answer in zip(visuals, questions, answers, strict=True):
        prompt = vlm.padded_prompt_embeds(visual, question)
        ids = torch.as_tensor(list(answer), dtype=torch.long, device=vlm.device)
        seqs.append(torch.cat([prompt, vlm.embed_tokens(ids).to(prompt.dtype)]))
        spans.append((prompt.shape[0] - 1, prompt.shape[0] - 1 + len(answer)))
    longest = max(s.shape[0] for s in seqs)
    batch = seqs[0].new_zeros((len(seqs), longest, seqs[0].shape[1]))
    mask = torch.zeros((len(seqs), longest), dtype=torch.long, device=vlm.device)
    for i, s in enumerate(seqs):
        batch[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    if vlm.visual_pad_tokens:  # padded rows attend as the runner's rows do (a 4D additive mask)
        mask = prefix_mask(vlm.runner, mask, batch.dtype)
    return batch, mask, spans


def teacher_forced(vlm: VisionLanguageModel, visuals: Sequence[VisualInput], questions: Sequence[str],
                   answers: Sequence[Sequence[int]], hidden_layers: Sequence[int] = (),
                   logits: bool = True) -> TeacherForced:
    """One batched, padded forward over prompt + answer for several samples (no KV cache).

    Row t of sample i's outputs is the state just before answer token t (the position that
    predicts it), so two models teacher-forced on the same answer ids are aligned by position.
    Gradients flow when called outside ``torch.no_grad`` (training).
    """
    runner = vlm.runner
    batch, mask, spans = _padded_batch(vlm, visuals, questions, answers)
    wanted = {runner.layer_index(layer) for layer in hidden_layers}
    states, hooks = {0: batch}, []  # forward hooks keep only the wanted layers (not all 33)
    for idx in wanted - {0, vlm.num_layers}:
        def keep(module, args, output, idx=idx):
            states[idx] = output[0] if isinstance(output, tuple) else output
        hooks.append(runner.layers[idx - 1].register_forward_hook(keep))
    try:
        out = runner.language_model(inputs_embeds=batch, attention_mask=mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    final = states[vlm.num_layers] = out.last_hidden_state
    result = TeacherForced(spans=spans)
    for layer in hidden_layers:
        chosen = states[runner.layer_index(layer)]
        result.hidden[layer] = [chosen[i, a:b] for i, (a, b) in enumerate(spans)]
    if logits:
        result.logits = [vlm.lm_head(final[i, a:b]).float() for i, (a, b) in enumerate(spans)]
    return result


@torch.no_grad()
def generate_greedy_batch(vlm: VisionLanguageModel, visuals: Sequence[VisualInput], questions: Sequence[str],
                          max_new_tokens: int, hidden_layers: Sequence[int] = ()) -> GreedyBatch:
    """Greedy answers of several samples decoded together (one decode step serves the whole batch).

    Each prompt is prefilled alone into its row of a batched static KV cache; decode steps run
    every row at its own position (a CUDA graph on CUDA). Each answer stops after the eos
    token, as ``autoregressive_generate`` does. With ``hidden_layers``, also returns each
    answer's states (row t = the state before answer token t): the target teacher-forced on
    its own answer, without a second prompt pass. Used where throughput matters (feature
    extraction); the speculative engine stays batch-1.
    """
    prompts = [vlm.padded_prompt_embeds(v, q) for v, q in zip(visuals, questions, strict=True)]
    return vlm.decoding.batched(vlm.device).generate(prompts, max_new_tokens, vlm.eos_token_id, hidden_layers)
