"""Fake language models with the uniform decode interface, for speculative-decoding tests.

In the style of litgpt's speculative tests: tiny vocabularies and logits that are a
deterministic function of the cached context, so a stale or untruncated cache changes
the output and is caught. A model's "cache" is the list of tokens it holds; its logits
come from a seeded random table indexed by the last two cached tokens, optionally passed
through a ``transform(tokens, logits)`` to build drafts that agree always, never or sometimes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Transform = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


@dataclass
class FakeState:
    """Decode state of a fake model: the cached tokens (prompt first) and the next-token logits."""

    tokens: list[int]
    prompt_length: int
    logits: torch.Tensor | None

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> list[int]:
        """Tokens in the cache after the prompt."""
        return self.tokens[self.prompt_length:]


@dataclass
class FakeLM:
    """A fake LM: logits = table[second-to-last token, last token] (then ``transform``).

    ``base_vocab_size`` is the shared base vocabulary (ids below it mean the same in a draft);
    ``eos_bias`` is added to the eos logit (negative: stops rarely). Records every forward.
    """

    vocab_size: int = 16
    seed: int = 0
    scale: float = 3.0
    eos_token_id: int | None = 1
    eos_bias: float = 0.0
    base_vocab_size: int | None = None
    transform: Transform | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    forward_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        v = self.vocab_size
        self.table = torch.randn(v + 1, v + 1, v, generator=g) * self.scale
        if self.eos_token_id is not None:
            self.table[..., self.eos_token_id] += self.eos_bias
        if self.base_vocab_size is None:
            self.base_vocab_size = v

    def context_logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """float32 next-token logits (V,) after ``tokens``."""
        v = self.vocab_size
        a = tokens[-2] if len(tokens) >= 2 else v
        b = tokens[-1] if len(tokens) >= 1 else v
        logits = self.table[a % (v + 1), b % (v + 1)].clone()
        return self.transform(tokens, logits) if self.transform is not None else logits

    def prefill(self, prompt: Sequence[int]) -> FakeState:
        """A fresh state holding ``prompt``."""
        tokens = [int(t) for t in prompt]
        return FakeState(tokens=tokens, prompt_length=len(tokens), logits=self.context_logits(tokens))

    def forward(self, state: FakeState, token_ids: Sequence[int], *, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Append 1..k tokens; return their logits (k, V) and set ``state.logits`` to the last row.

        With ``attn_mask`` (k, length + k) row i's context is the cached + fed tokens it may see.
        """
        ids = [int(t) for t in token_ids]
        if attn_mask is not None:
            return self._masked_forward(state, ids, attn_mask)
        if not ids:
            raise ValueError("forward needs at least one token")
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise ValueError(f"token id out of range for vocab {self.vocab_size}: {ids}")
        rows = []
        for t in ids:
            state.tokens.append(t)
            rows.append(self.context_logits(state.tokens))
        self.forward_sizes.append(len(ids))
        state.logits = rows[-1]
        return torch.stack(rows)

    def _masked_forward(self, state: FakeState, ids: list[int], attn_mask: torch.Tensor) -> torch.Tensor:
        if tuple(attn_mask.shape) != (len(ids), state.length + len(ids)):
            raise ValueError(f"bad mask shape {tuple(attn_mask.shape)}")
        state.tokens.extend(ids)
        rows = [self.context_logits([t for t, seen in zip(state.tokens, row.tolist()) if seen]) for row in attn_mask]
        self.forward_sizes.append(len(ids))
        state.logits = rows[-1]
        return torch.stack(rows)

    def compact(self, state: FakeState, start: int, keep: Sequence[int]) -> None:
        """Keep fed rows ``keep`` (relative to ``start``) in order; drop the rest."""
        state.tokens[start:] = [state.tokens[start + k] for k in keep]

    def truncate(self, state: FakeState, length: int) -> None:
        """Forget cached tokens at or after ``length``; the logits become invalid (None)."""
        if not state.prompt_length <= length <= state.length:
            raise ValueError(f"bad truncate to {length} (prompt {state.prompt_length}, length {state.length})")
        del state.tokens[length:]
        state.logits = None


def _coin(tokens: Sequence[int], seed: int, p: float) -> bool:
    key = f"{seed}:{tokens[-2] if len(tokens) > 1 else -1}:{tokens[-1] if tokens else -1}".encode()
    return (zlib.crc32(key) % 10_000) / 10_000 < p


def copy_of(target: FakeLM, **overrides) -> FakeLM:
    """A draft that is an exact copy of ``target`` (always agrees at temperature 0)."""
    kwargs = dict(vocab_size=target.vocab_size, seed=target.seed, scale=target.scale,
                  eos_token_id=target.eos_token_id, eos_bias=target.eos_bias,
                  base_vocab_size=target.base_vocab_size)
    kwargs.update(overrides)
    return FakeLM(**kwargs)


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """Logits rolled by one id: the argmax moves to argmax + 1 (mod V)."""
    return torch.roll(logits, 1)


def never_agree(target: FakeLM) -> FakeLM:
    """A draft whose greedy choice always differs from the target's (argmax shifted by one)."""
    return copy_of(target, transform=lambda tokens, logits: shifted(logits))


def sometimes_agree(target: FakeLM, p: float = 0.5, seed: int = 7) -> FakeLM:
    """A draft that agrees with the target in about ``p`` of contexts (a hash coin per context)."""
    return copy_of(target, transform=lambda tokens, logits: logits if _coin(tokens, seed, p) else shifted(logits))


def special_loving(target: FakeLM, extra: int = 4) -> FakeLM:
    """A draft with ``extra`` ids beyond the target's base vocabulary that it always prefers."""
    base = target.base_vocab_size

    def boost(tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.cat([logits, torch.zeros(extra)]) if logits.shape[0] < base + extra else logits.clone()
        out[base:] = 100.0
        return out

    return copy_of(target, transform=boost)


class RecordingDrafter:
    """Wraps a drafter and records every proposal (to check what was drafted)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", "recording")
        self.proposals: list[list[int]] = []

    @property
    def stats(self):
        return self.inner.stats

    def propose(self, context: list[int], gamma: int):
        proposal = self.inner.propose(context, gamma)
        self.proposals.append(list(proposal.tokens))
        return proposal


class FakeTreeDrafter:
    """Drafts EAGLE-2 trees from a FakeLM's log-softmax over context + path (``common.tree.build_tree``).

    ``sample``: children drawn WITHOUT replacement from softmax(logits / temperature) (exactly
    ``topk`` of them, no pruning: every node of depth < max is expanded) and their q recorded,
    instead of the deterministic top-k.
    """

    def __init__(self, draft: FakeLM, prompt: Sequence[int], *, stop_token_ids: Sequence[int] = (),
                 sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None):
        self.draft, self.prompt = draft, [int(t) for t in prompt]
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.sample, self.temperature, self.generator = sample, temperature, generator
        self.name = "fake_tree"
        self.stats = {"steps": 0}
        self.trees: list = []

    def logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.log_softmax(self.draft.context_logits(self.prompt + list(tokens)), dim=-1)

    def propose_tree(self, context: list[int], config, max_depth: int):
        from common.tree import build_tree

        if self.sample:
            tree = self._sampled_tree(list(context), config, max_depth)
        else:
            tree = build_tree(self.logprobs(context), lambda t, frontier: torch.stack(
                [self.logprobs(list(context) + t.path_tokens(i)) for i in frontier]), config,
                max_depth=max_depth, stop_tokens=self.stop_token_ids)
        self.trees.append(tree)
        self.stats["steps"] += 1
        return tree

    def _sampled_tree(self, context: list[int], config, max_depth: int):
        from common.tree import DraftTree

        tree = DraftTree()
        frontier = [-1]
        for _ in range(min(config.max_depth, max_depth)):
            nxt = []
            for node in frontier:
                q = torch.softmax(self.draft.context_logits(self.prompt + context + tree.path_tokens(node))
                                  / self.temperature, dim=-1)
                tree.probs[node] = q
                picks = torch.multinomial(q, config.topk, replacement=False, generator=self.generator)
                for t in picks.tolist():
                    tree.tokens.append(int(t))
                    tree.parents.append(node)
                    tree.scores.append(0.0)
                    nxt.append(len(tree.tokens) - 1)
            frontier = nxt
        return tree
