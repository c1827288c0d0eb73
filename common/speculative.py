"""Speculative decoding: draft, verify, accept, KV rollback, metrics and theory.

A small pure engine over two objects with the uniform model interface
(:mod:`common.vlm`): a *target* that must keep its exact output, and a *drafter* that
proposes the next tokens. In the spirit of gpt-fast's ``speculative_decode``: models are
passed in, nothing is global, and fakes can stand in for both in tests.

The target only needs ``forward(state, ids) -> logits (k, V)``, ``truncate(state, length)``,
``vocab_size`` and ``eos_token_id``; its state needs ``logits``, ``length`` and
``prompt_length``. A drafter is anything with ``propose(context, gamma) -> DraftProposal``.

Lossless by construction:

- temperature 0: a draft token is accepted while it equals the target's argmax, and the
  next token always comes from the target, so the output is token-for-token the target's
  own greedy output (:func:`autoregressive_generate`);
- temperature > 0: rejection sampling (Leviathan et al. 2023): accept a draft token ``d``
  with probability ``min(1, p(d) / q(d))``, on rejection draw from ``norm(max(0, p - q))``,
  after a fully accepted draft draw the bonus token from ``p``; the output distribution
  is exactly the target's.

Metrics follow vLLM (acceptance rate, mean accepted length, per-position acceptance);
the Leviathan formulas give the *predicted* gain from measured rates and costs.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from common.sampling import (
    is_greedy,
    mask_from,
    probs_from_logits,
    sample_from_logits,
    sample_from_probs,
    uniform,
)
from common.tree import DraftTree, TreeConfig, propose_tree, verify_tree

Clock = Callable[[], float]
SyncFn = Callable[[], None]

__all__ = [
    "DraftProposal", "Drafter", "DraftStats", "SyncedDrafter", "DrafterFactoryProtocol", "ModelDrafter",
    "StaticDrafter",
    "SpecResult", "GenerationResult",
    "speculative_generate", "autoregressive_generate", "aggregate_metrics",
    "expected_tokens_per_step", "predicted_speedup",
    "common_prefix_length",
]


# ----------------------------------------------------------------------------------------
# Drafters
# ----------------------------------------------------------------------------------------

@dataclass
class DraftProposal:
    """Draft tokens (target ids) and, for sampled drafts, their distributions q (len(tokens), V_target).

    ``probs`` is None for a deterministic (greedy) drafter: q is then one-hot on each token.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None

    def limited(self, n: int) -> DraftProposal:
        """The first ``n`` tokens (and their distributions) of this proposal."""
        n = max(int(n), 0)
        if n >= len(self.tokens):
            return self
        return DraftProposal(list(self.tokens[:n]), None if self.probs is None else self.probs[:n])


class Drafter(Protocol):
    """Proposes the next ``gamma`` tokens after ``context`` (all tokens generated so far, target ids).

    A drafter keeps its own state and syncs it to ``context`` itself; it may propose fewer
    than ``gamma`` tokens (none degenerates into plain decoding).
    """

    name: str

    def propose(self, context: list[int], gamma: int) -> DraftProposal: ...


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StaticDrafter:
    """Proposes a fixed script by position: ``tokens[len(context): len(context) + gamma]``.

    Useful in tests and to replay a precomputed draft text (e.g. the draft model's own answer).
    """

    def __init__(self, tokens: Sequence[int], name: str = "static"):
        self.tokens = [int(t) for t in tokens]
        self.name = name
        self.stats: dict[str, Any] = {"steps": 0, "tokens_fed": 0, "seconds": 0.0, "proposals": 0,
                                      "tokens_proposed": 0}

    def propose(self, context: list[int], gamma: int) -> DraftProposal:
        """The next ``gamma`` script tokens after position ``len(context)``."""
        start = len(context)
        out = self.tokens[start:start + max(int(gamma), 0)]
        self.stats["proposals"] += 1
        self.stats["tokens_proposed"] += len(out)
        return DraftProposal(out, None)


_STAT_FIELDS = ("steps", "tokens_fed", "seconds", "proposals", "tokens_proposed")


@dataclass
class DraftStats(MutableMapping):
    """A drafter's counters: draft forward calls (``steps``), ``tokens_fed``, ``seconds`` spent in
    ``propose``, ``proposals`` and ``tokens_proposed``; ``extra`` holds a drafter's own counters.

    Reads like the dict it replaces (``stats["steps"]``, ``dict(stats)``), ``extra`` keys included.
    """

    steps: int = 0
    tokens_fed: int = 0
    seconds: float = 0.0
    proposals: int = 0
    tokens_proposed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key) if key in _STAT_FIELDS else self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _STAT_FIELDS:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _STAT_FIELDS:
            raise KeyError(f"{key} is a fixed draft counter")
        del self.extra[key]

    def __iter__(self):
        return iter((*_STAT_FIELDS, *self.extra))

    def __len__(self) -> int:
        return len(_STAT_FIELDS) + len(self.extra)


class SyncedDrafter:
    """Base of the drafters that keep a draft cache in step with the accepted context.

    It owns the one cache-sync routine: keep the longest common prefix of the fed tokens and
    ``context``, roll the cache back to it, feed the missing tokens in one forward. Row ``j`` of
    :attr:`rows` is the draft's output after ``fed_tokens[:j]`` (row 0: after the prompt); a
    subclass may store None for rows it does not keep, and a sync ending on such a row refeeds
    the last token. It also owns timing (``sync`` makes the clock wait for the device) and the
    typed :class:`DraftStats`.

    Subclasses implement ``_forward(tokens) -> one row per token`` (advancing the draft cache),
    ``_truncate(keep)`` (cache back to ``keep`` fed tokens) and ``_draft(context, gamma)``.
    """

    name: str = "drafter"

    def __init__(self, first_row: Any, *, name: str | None = None, sync: SyncFn | None = None,
                 clock: Clock = time.perf_counter, **extra_stats: Any):
        if name is not None:
            self.name = name
        self._now = _make_now(sync, clock)
        self._fed: list[int] = []
        self._rows: list[Any] = [first_row]
        self.stats = DraftStats(extra=dict(extra_stats))

    @staticmethod
    def check_fresh(state: Any, who: str) -> None:
        """Raise unless ``state`` holds only its prompt (a fresh prefill)."""
        if state is not None and state.length != state.prompt_length:
            raise ValueError(f"{who} needs a freshly prefilled state "
                             f"(length {state.length} != prompt_length {state.prompt_length})")

    @property
    def fed_tokens(self) -> list[int]:
        """Tokens currently in the draft cache after the prompt."""
        return list(self._fed)

    @property
    def rows(self) -> list[Any]:
        """The draft's outputs for rows 0..len(fed_tokens)."""
        return list(self._rows)

    def _forward(self, tokens: list[int]) -> Sequence[Any]:
        raise NotImplementedError

    def _truncate(self, keep: int) -> None:
        raise NotImplementedError

    def _draft(self, context: list[int], gamma: int) -> DraftProposal:
        raise NotImplementedError

    def _feed(self, tokens: Sequence[int]) -> None:
        """Run the draft over ``tokens`` after the fed ones; their output rows are appended."""
        tokens = [int(t) for t in tokens]
        self._rows.extend(self._forward(tokens))
        self._fed.extend(tokens)
        self.stats.steps += 1
        self.stats.tokens_fed += len(tokens)

    def _rollback(self, keep: int) -> None:
        self._truncate(keep)
        del self._fed[keep:]
        del self._rows[keep + 1:]

    def sync_to(self, context: Sequence[int]) -> None:
        """Make the draft cache hold exactly ``context`` after the prompt, with its last row."""
        keep = common_prefix_length(self._fed, context)
        if keep < len(self._fed):
            self._rollback(keep)
        missing = [int(t) for t in context[keep:]]
        if missing:
            self._feed(missing)
        elif self._fed and self._rows[-1] is None:  # that row was not kept: refeed its token
            last = self._fed[-1]
            self._rollback(len(self._fed) - 1)
            self._feed([last])

    def propose(self, context: list[int], gamma: int) -> DraftProposal:
        """Up to ``gamma`` draft tokens after ``context`` (timed and counted)."""
        start = self._now()
        proposal = self._draft([int(t) for t in context], int(gamma)) if gamma > 0 else DraftProposal([], None)
        self.stats.proposals += 1
        self.stats.tokens_proposed += len(proposal.tokens)
        self.stats.seconds += self._now() - start
        return proposal


class DrafterFactoryProtocol(Protocol):
    """Builds a drafter per sample: ``factory(draft, draft_state, target) -> Drafter``.

    ``kind`` names it; ``hidden_layers`` are the draft layers its prefill must keep;
    ``engine_target(target)`` is the object the engine verifies with (the target itself, or a
    wrapper recording what the drafter reads).
    """

    kind: str
    hidden_layers: Sequence[int]

    def engine_target(self, target: Any) -> Any: ...

    def __call__(self, draft: Any, draft_state: Any, target: Any) -> Drafter: ...


class ModelDrafter(SyncedDrafter):
    """Drafts with a prefilled model behind the uniform interface (e.g. EventGPT).

    ``state`` must be freshly prefilled (its logits predict the first new token). The
    drafter remembers which tokens it fed after the prompt; on each :meth:`propose` it keeps
    the longest common prefix with ``context``, rolls its cache back to it, feeds the missing
    context tokens in one forward, then decodes ``gamma`` tokens one at a time (the last one
    is not fed: if it is rejected that forward would be wasted).

    Draft ids >= ``vocab_limit`` (the shared base vocabulary) are never proposed: their
    logits are masked to -inf in target space. ``map_logits(draft_logits (V_draft,)) ->
    target logits (V_target,)`` is the plug-in point for token maps and adapters; the default
    copies the first ``vocab_limit`` entries into a -inf vector of ``target_vocab_size``
    (default ``vocab_limit``; the engine pads narrower q with zeros).

    Context tokens the draft cannot take (target ids >= ``vocab_limit``, e.g. Video-LLaVA's
    special or padding rows) are fed to the draft as ``unknown_token_id`` (default 0, ``<unk>``
    in LLaMA tokenizers); the context itself is never altered.

    ``stats`` counts forward calls (``steps``), ``tokens_fed`` and ``seconds`` spent in
    :meth:`propose` (device-synchronised when ``sync`` is given), so callers can measure
    the draft cost.
    """

    def __init__(self, model: Any, state: Any, *, vocab_limit: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None,
                 map_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 target_vocab_size: int | None = None, stop_token_ids: Iterable[int] = (),
                 name: str = "model", sync: SyncFn | None = None, clock: Clock = time.perf_counter,
                 unknown_token_id: int = 0):
        self.check_fresh(state, "ModelDrafter")
        super().__init__(state.logits, name=name, sync=sync, clock=clock)
        self.model, self.state = model, state
        self.vocab_limit = int(vocab_limit)
        self.target_vocab_size = int(target_vocab_size) if target_vocab_size is not None else self.vocab_limit
        self.temperature = float(temperature)
        self.generator = generator
        self.map_logits = map_logits if map_logits is not None else self._copy_base_vocab
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.unknown_token_id = int(unknown_token_id)

    def _copy_base_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.target_vocab_size,), float("-inf"), dtype=torch.float32, device=logits.device)
        n = min(self.vocab_limit, int(logits.shape[-1]), self.target_vocab_size)
        out[:n] = logits[:n].float()
        return out

    def _forward(self, tokens: list[int]) -> list[torch.Tensor | None]:
        """Only the last row's logits are kept (a rollback onto another row refeeds its token)."""
        known = [t if t < self.vocab_limit else self.unknown_token_id for t in tokens]
        logits = self.model.forward(self.state, known)
        return [None] * (len(tokens) - 1) + [logits[-1]]

    def _truncate(self, keep: int) -> None:
        self.model.truncate(self.state, self.state.prompt_length + keep)

    def _pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        mapped = mask_from(self.map_logits(logits).float(), self.vocab_limit)
        if is_greedy(self.temperature):
            return int(mapped.argmax().item()), None
        q = probs_from_logits(mapped, self.temperature)
        return sample_from_probs(q, self.generator), q

    def _draft(self, context: list[int], gamma: int) -> DraftProposal:
        """Sync to ``context`` and draft up to ``gamma`` tokens (stopping after a stop token)."""
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        self.sync_to(context)
        for i in range(gamma):
            token, q = self._pick(self._rows[-1])
            tokens.append(token)
            if q is not None:
                rows.append(q)
            if token in self.stop_token_ids or i == gamma - 1:
                break
            self._feed([token])
        return DraftProposal(tokens, torch.stack(rows) if rows else None)


# ----------------------------------------------------------------------------------------
# Results and metrics
# ----------------------------------------------------------------------------------------

def _histogram(iterations: Sequence[tuple[int, int]]) -> dict[int, int]:
    return dict(sorted(Counter(acc for _, acc in iterations).items()))


def _position_counts(iterations: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Per draft position i: steps that drafted >= i+1 tokens, and those that accepted >= i+1."""
    depth = max((d for d, _ in iterations), default=0)
    reached, accepted = [0] * depth, [0] * depth
    for drafted, acc in iterations:
        for i in range(drafted):
            reached[i] += 1
            accepted[i] += int(acc > i)
    return reached, accepted


def _metrics(iterations: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """vLLM-style metrics of a list of (drafted, accepted) verify steps."""
    drafted = sum(d for d, _ in iterations)
    accepted = sum(a for _, a in iterations)
    steps = len(iterations)
    rejections = sum(1 for d, a in iterations if a < d)
    reached, acc_at = _position_counts(iterations)
    return {
        "num_drafted": drafted,
        "num_accepted": accepted,
        "num_verify_steps": steps,
        "num_rejections": rejections,
        "acceptance_rate": accepted / drafted if drafted else None,
        "token_acceptance_probability": accepted / (accepted + rejections) if accepted + rejections else None,
        "mean_accepted_length": 1.0 + accepted / steps if steps else None,
        "per_position_acceptance": [a / r for a, r in zip(acc_at, reached)],
        "per_position_counts": [[a, r] for a, r in zip(acc_at, reached)],
        "accepted_length_histogram": _histogram(iterations),
    }


@dataclass
class GenerationResult:
    """Plain autoregressive output: tokens, wall seconds, and model forward calls (``steps``)."""

    tokens: list[int]
    seconds: float
    steps: int
    stop_reason: str = "max_new_tokens"

    @property
    def seconds_per_step(self) -> float | None:
        """Average wall seconds per forward call (None when no forward ran)."""
        return self.seconds / self.steps if self.steps else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"tokens": list(self.tokens), "num_tokens": len(self.tokens), "seconds": self.seconds,
                "steps": self.steps, "seconds_per_step": self.seconds_per_step, "stop_reason": self.stop_reason}


@dataclass
class SpecResult:
    """Output and accounting of one speculative generation.

    ``iterations`` holds one (drafted, accepted) pair per verify step; every step emits
    ``accepted + 1`` tokens (the +1 is the target's correction or bonus token), so
    ``len(tokens) == num_accepted + num_verify_steps`` up to trimming at a stop token or at
    ``max_new_tokens``. A step that drafted nothing still counts (it is a target pass).
    """

    tokens: list[int]
    iterations: list[tuple[int, int]] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    target_forwards: int = 0
    draft_steps: int | None = None
    stop_reason: str = "max_new_tokens"

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, prefix: str = "", tokens: str = "token_ids",
                    total_seconds: str = "speculative_decode_time") -> SpecResult:
        """The result stored in a results record: keys ``<prefix>token_ids``, ``<prefix>iterations``,
        ``<prefix>draft_seconds``, ``<prefix>verify_seconds``, ``<prefix>target_forwards``,
        ``<prefix>draft_steps`` (optional), and the ``tokens`` / ``total_seconds`` keys as named."""
        return cls(tokens=list(record[prefix + tokens]),
                   iterations=[(int(d), int(a)) for d, a in record[prefix + "iterations"]],
                   draft_seconds=record[prefix + "draft_seconds"], verify_seconds=record[prefix + "verify_seconds"],
                   total_seconds=record[prefix + total_seconds], target_forwards=record[prefix + "target_forwards"],
                   draft_steps=record.get(prefix + "draft_steps"))

    @property
    def num_drafted(self) -> int:
        return sum(d for d, _ in self.iterations)

    @property
    def num_accepted(self) -> int:
        return sum(a for _, a in self.iterations)

    @property
    def num_verify_steps(self) -> int:
        return len(self.iterations)

    @property
    def acceptance_rate(self) -> float | None:
        """Draft acceptance rate (vLLM): accepted / drafted; None when nothing was drafted."""
        return _metrics(self.iterations)["acceptance_rate"]

    @property
    def token_acceptance_probability(self) -> float | None:
        """Per-token acceptance probability, accepted / (accepted + rejections): the ``a`` of Leviathan.

        Unlike :attr:`acceptance_rate` it does not count draft tokens after the first
        rejection (they were never tested), so it is the estimate to put into
        :func:`predicted_speedup`.
        """
        return _metrics(self.iterations)["token_acceptance_probability"]

    @property
    def mean_accepted_length(self) -> float | None:
        """1 + accepted / verify steps: tokens emitted per target pass, bonus token included."""
        return _metrics(self.iterations)["mean_accepted_length"]

    @property
    def per_position_acceptance(self) -> list[float]:
        """For draft position i: share of steps that drafted >= i+1 tokens whose first i+1 were accepted."""
        return _metrics(self.iterations)["per_position_acceptance"]

    @property
    def accepted_length_histogram(self) -> dict[int, int]:
        """Number of accepted draft tokens -> count of verify steps."""
        return _metrics(self.iterations)["accepted_length_histogram"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: tokens, counts, metrics, per-iteration (drafted, accepted), timings."""
        out = _metrics(self.iterations)
        out["accepted_length_histogram"] = {str(k): v for k, v in out["accepted_length_histogram"].items()}
        out.update({
            "tokens": list(self.tokens),
            "num_tokens": len(self.tokens),
            "iterations": [list(it) for it in self.iterations],
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
            "target_forwards": self.target_forwards,
            "draft_steps": self.draft_steps,
            "stop_reason": self.stop_reason,
        })
        return out


def aggregate_metrics(results: Sequence[SpecResult]) -> dict[str, Any]:
    """Pool many generations: every count is the sum over samples, rates are pooled ratios."""
    iterations = [it for r in results for it in r.iterations]
    out = _metrics(iterations)
    out["accepted_length_histogram"] = {str(k): v for k, v in out["accepted_length_histogram"].items()}
    draft_steps = [r.draft_steps for r in results if r.draft_steps is not None]
    out.update({
        "num_samples": len(results),
        "num_tokens": sum(len(r.tokens) for r in results),
        "draft_seconds": sum(r.draft_seconds for r in results),
        "verify_seconds": sum(r.verify_seconds for r in results),
        "total_seconds": sum(r.total_seconds for r in results),
        "target_forwards": sum(r.target_forwards for r in results),
        "draft_steps": sum(draft_steps) if draft_steps else None,
    })
    return out


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------

def _make_now(sync: SyncFn | None, clock: Clock) -> Clock:
    """A clock that synchronises the device (``sync``) before reading the time."""
    if sync is None:
        return clock

    def now() -> float:
        sync()
        return clock()

    return now


def _stop_set(model: Any, stop_token_ids: Iterable[int] | None) -> frozenset[int]:
    if stop_token_ids is not None:
        return frozenset(int(t) for t in stop_token_ids)
    eos = getattr(model, "eos_token_id", None)
    return frozenset() if eos is None else frozenset({int(eos)})


def _first_stop(tokens: Sequence[int], stops: frozenset[int]) -> int | None:
    for i, t in enumerate(tokens):
        if t in stops:
            return i
    return None


def _drafter_steps(drafter: Any) -> int | None:
    stats = getattr(drafter, "stats", None)
    return int(stats["steps"]) if isinstance(stats, Mapping) and "steps" in stats else None


def _fit_width(q: torch.Tensor, width: int) -> torch.Tensor:
    """Draft probabilities padded with zeros (or cut) to the target vocabulary width."""
    if q.shape[-1] == width:
        return q
    if q.shape[-1] > width:
        return q[..., :width]
    return torch.nn.functional.pad(q, (0, width - q.shape[-1]))


def _accept_greedy(dist: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """Accept while the draft equals the target's argmax; the next token is the argmax after them."""
    best = dist.argmax(dim=-1).tolist()
    n = common_prefix_length(draft, best)
    return n, int(best[n])


def _accept_sampled(dist: torch.Tensor, draft: list[int], q: torch.Tensor | None, temperature: float,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection sampling of ``draft`` against p = softmax(dist / T); returns (accepted, next token)."""
    device = generator.device if generator is not None else dist.device
    p = probs_from_logits(dist, temperature).to(device)
    if q is not None:
        q = _fit_width(q.float().to(device), p.shape[-1])
    for i, d in enumerate(draft):
        p_d = float(p[i, d])
        q_d = float(q[i, d]) if q is not None else 1.0
        ratio = p_d / q_d if q_d > 0 else (math.inf if p_d > 0 else 0.0)
        if ratio >= 1.0 or uniform(generator) < ratio:
            continue
        if q is not None:
            residual = torch.clamp(p[i] - q[i], min=0.0)
        else:
            residual = p[i].clone()
            residual[d] = 0.0
        if float(residual.sum()) <= 0.0:  # only reachable through rounding: p == q
            residual = p[i]
        return i, sample_from_probs(residual, generator)
    return len(draft), sample_from_probs(p[len(draft)], generator)


def _verify(target: Any, state: Any, pending: list[int], proposal: DraftProposal, temperature: float,
            generator: torch.Generator | None) -> tuple[int, int, int]:
    """Feed ``pending + draft`` in one forward, accept, roll back; returns (accepted, next, forwards)."""
    draft = proposal.tokens
    vocab = int(target.vocab_size)
    if any(t < 0 or t >= vocab for t in draft):
        raise ValueError(f"draft token outside the target vocabulary [0, {vocab}): {draft}")
    base = state.length
    rows = [] if pending else [state.logits.reshape(1, -1)]  # right after prefill
    feed = pending + draft
    forwards = 0
    if feed:
        rows.append(target.forward(state, feed))
        forwards = 1
    dist = torch.cat(rows) if len(rows) > 1 else rows[0]
    if is_greedy(temperature):
        n, nxt = _accept_greedy(dist, draft)
    else:
        n, nxt = _accept_sampled(dist, draft, proposal.probs, temperature, generator)
    if n < len(draft):
        target.truncate(state, base + len(pending) + n)
    return n, nxt, forwards


def _tree_step(target: Any, state: Any, drafter: Any, generated: list[int], pending: list[int], tree: TreeConfig,
               budget: int, temperature: float, generator: torch.Generator | None, result: SpecResult,
               now: Clock) -> list[int]:
    """Draft a tree, verify it in one forward (common.tree); returns the emitted tokens (accepted + next)."""
    t0 = now()
    dtree = propose_tree(drafter, list(generated), tree, budget).limited(budget) if budget > 0 else DraftTree()
    result.draft_seconds += now() - t0
    t0 = now()
    accepted, nxt, forwards = verify_tree(target, state, pending, dtree, temperature, generator)
    result.verify_seconds += now() - t0
    result.target_forwards += forwards
    result.iterations.append((dtree.depth, len(accepted)))
    return accepted + [nxt]


def speculative_generate(target: Any, target_state: Any, drafter: Drafter, *, max_new_tokens: int, gamma: int,
                         temperature: float = 0.0, generator: torch.Generator | None = None,
                         stop_token_ids: Iterable[int] | None = None,
                         initial_proposal: DraftProposal | None = None, sync: SyncFn | None = None,
                         clock: Clock = time.perf_counter, tree: TreeConfig | None = None) -> SpecResult:
    """Generate with ``drafter`` proposing and ``target`` verifying; the output is the target's own.

    ``target_state`` must be freshly prefilled. Each step drafts ``min(gamma, remaining - 1)``
    tokens (``initial_proposal``, the "free" tokens drafted during the target's prefill, is
    used instead on the first step and may be longer than ``gamma``), feeds the pending
    token plus the draft to the target in one forward, accepts a prefix, takes the next
    token from the target and rolls the target cache back past rejected drafts.

    Stops after a stop token (default: the target's eos; it is included in the output, as
    HF generate does) or at ``max_new_tokens``. At temperature 0 the output equals
    :func:`autoregressive_generate`'s; above 0 it has the target's distribution, with all
    randomness drawn from ``generator``. ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before every clock read. With ``tree`` (:mod:`common.tree`), each step except one that
    verifies ``initial_proposal`` drafts a tree (``drafter.propose_tree``) verified in one
    forward; its iteration records (tree depth, accepted) and ``gamma`` is unused there.
    """
    if max_new_tokens < 0 or gamma < 0:
        raise ValueError("max_new_tokens and gamma must be >= 0")
    if target_state.length != target_state.prompt_length:
        raise ValueError("speculative_generate needs a freshly prefilled target state")
    stops = _stop_set(target, stop_token_ids)
    now = _make_now(sync, clock)
    steps_before = _drafter_steps(drafter)
    result = SpecResult(tokens=[])
    generated: list[int] = []
    pending: list[int] = []
    proposal = initial_proposal
    start = now()
    while len(generated) < max_new_tokens:
        budget = max_new_tokens - len(generated) - 1  # draft tokens that can still be emitted
        if tree is not None and proposal is None:
            new = _tree_step(target, target_state, drafter, generated, pending, tree, budget, temperature,
                             generator, result, now)
            pending = [new[-1]]
            cut = _first_stop(new, stops)
            generated.extend(new if cut is None else new[:cut + 1])
            if cut is not None:
                result.stop_reason = "stop_token"
                break
            continue
        if proposal is None:
            n_draft = min(gamma, budget)
            proposal = DraftProposal([])
            if n_draft > 0:
                t0 = now()
                proposal = drafter.propose(list(generated), n_draft)
                result.draft_seconds += now() - t0
        proposal = proposal.limited(budget)
        t0 = now()
        n_acc, nxt, forwards = _verify(target, target_state, pending, proposal, temperature, generator)
        result.verify_seconds += now() - t0
        result.target_forwards += forwards
        result.iterations.append((len(proposal.tokens), n_acc))
        new = [int(t) for t in proposal.tokens[:n_acc]] + [nxt]
        pending = [nxt]
        proposal = None
        cut = _first_stop(new, stops)
        if cut is not None:
            generated.extend(new[:cut + 1])
            result.stop_reason = "stop_token"
            break
        generated.extend(new)
    result.total_seconds = now() - start
    result.tokens = generated[:max_new_tokens]
    steps_after = _drafter_steps(drafter)
    if steps_before is not None and steps_after is not None:
        result.draft_steps = steps_after - steps_before
    return result


def autoregressive_generate(model: Any, state: Any, *, max_new_tokens: int, temperature: float = 0.0,
                            generator: torch.Generator | None = None,
                            stop_token_ids: Iterable[int] | None = None, sync: SyncFn | None = None,
                            clock: Clock = time.perf_counter) -> GenerationResult:
    """Plain decoding from a freshly prefilled ``state``: the baseline, same sampling and stop rules.

    ``steps`` counts forward calls (the last token is not fed, as in HF generate).
    """
    stops = _stop_set(model, stop_token_ids)
    now = _make_now(sync, clock)
    start = now()
    tokens: list[int] = []
    steps = 0
    reason = "max_new_tokens"
    logits = state.logits
    while len(tokens) < max_new_tokens:
        token = sample_from_logits(logits, temperature, generator)
        tokens.append(token)
        if token in stops:
            reason = "stop_token"
            break
        if len(tokens) >= max_new_tokens:
            break
        logits = model.forward(state, [token])[-1]
        steps += 1
    return GenerationResult(tokens=tokens, seconds=now() - start, steps=steps, stop_reason=reason)


# ----------------------------------------------------------------------------------------
# Theory (Leviathan et al. 2023)
# ----------------------------------------------------------------------------------------

def _check_rate(a: float, gamma: int) -> None:
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


def expected_tokens_per_step(a: float, gamma: int) -> float:
    """Expected tokens per target pass, (1 - a^(g+1)) / (1 - a); g + 1 at a = 1.

    A *prediction* under i.i.d. acceptance: compute it from the MEASURED per-token
    acceptance (:attr:`SpecResult.token_acceptance_probability`) and always report it
    beside the measured mean accepted length, never instead of it.
    """
    _check_rate(a, gamma)
    if a == 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def predicted_speedup(a: float, gamma: int, c: float) -> float:
    """Predicted wall-time gain (1 - a^(g+1)) / ((1 - a)(g c + 1)), c = draft step / target step cost.

    A *prediction* from the MEASURED acceptance ``a`` and MEASURED cost ratio ``c``
    (draft step seconds / target step seconds); it ignores verification overhead, prefill and overlap,
    so it must always be reported beside the measured wall-clock speedup.
    """
    if c < 0:
        raise ValueError(f"cost ratio must be >= 0, got {c}")
    return expected_tokens_per_step(a, gamma) / (gamma * c + 1.0)
