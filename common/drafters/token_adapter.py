"""TokenAdapter: a small causal transformer that turns the draft's view into the target's next token.

Why the inputs look like this. A drafter is used *live*: after each verify step the accepted
context is the TARGET's own output, and the adapter must propose the target's next tokens
from it. So the adapter is trained exactly as it is used, teacher forced on the target's
answer: to predict target token ``t_j`` it sees

- the target prefix ``t_0 .. t_{j-1}`` (the accepted context; BOS at j = 0),
- the draft's whole free-running answer ``D`` (EventGPT's own greedy answer to the same
  clip and question, computed once, e.g. during the target's prefill) as a prefix segment,
  plus ``D_j``, the draft token at the same index, as a per-position feature,
- ``e_j``: the draft model's greedy next token given the target prefix (EventGPT teacher
  forced on ``t_<j``), the token the raw EventGPT drafter would propose at that position.

At verification a token at draft position k of a block only counts if the k-1 before it were
accepted, i.e. equal the target's tokens, so every token that can be accepted live was produced
from exactly the inputs seen in training: teacher-forced top-1 predicts the live acceptance
(``simulate_live_acceptance``). A model over draft ids alone (the earlier design) never sees the
accepted context and drifts as soon as the two answers diverge.

Layout: ``[D_0 .. D_{M-1}] [x_0 .. x_{N-1}]`` with
``x_j = tok(t_{j-1}) + role_t + pos_t[j] + P_next tok(e_j) + P_aligned tok(D_j)``, one causal
transformer, output at target positions = logits over the shared base vocabulary (tied to the
token embedding). Either draft feature can be switched off (``use_draft_answer``,
``use_draft_next``); without ``use_draft_next`` the drafter needs no draft-model forward per step.

Checkpoints are nanoGPT-style: ``config.json`` (the :class:`TokenAdapterConfig`) next to
``model.safetensors``, so a checkpoint always carries the config that made it.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.models.checkpoint import safetensors_header
from common.results import atomic_write, atomic_write_json
from common.speculative import DraftProposal, SyncedDrafter, autoregressive_generate

MODEL_TYPE = "token_adapter"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
IGNORE = -100


@dataclass
class TokenAdapterConfig:
    """Everything needed to rebuild a TokenAdapter (saved as the checkpoint's config.json)."""

    draft_vocab_size: int  # rows of the draft model's vocabulary (draft ids fed in)
    target_vocab_size: int  # rows of the target's vocabulary (target ids fed in)
    vocab_limit: int  # shared base vocabulary: the output classes; draft-next ids are argmax below it
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    max_draft_len: int = 128  # draft answer tokens kept (longer ones are cut)
    max_positions: int = 512  # learned positions per segment (later ones share the last)
    draft_answer_tokens: int = 50  # max_new_tokens of the draft answers trained on (live drafts the same)
    use_draft_answer: bool = True
    use_draft_next: bool = True
    model_type: str = MODEL_TYPE
    version: int = 1
    extra: dict = field(default_factory=dict)  # training provenance (not used by the model)

    @property
    def in_vocab(self) -> int:
        return max(self.draft_vocab_size, self.target_vocab_size)

    @property
    def bos_id(self) -> int:
        return self.in_vocab

    @property
    def unk_id(self) -> int:
        return self.in_vocab + 1

    @property
    def none_id(self) -> int:  # "no draft token at this index"
        return self.in_vocab + 2

    @classmethod
    def from_dict(cls, data: dict) -> TokenAdapterConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AdapterExample:
    """One teacher-forced sequence: the draft's answer, target ids, and the draft-next id per target position.

    ``target`` may end with a placeholder (any int, e.g. -1) to ask for the prediction after the
    real prefix; ``draft_next`` has one id per target position (may be empty if unused).
    """

    draft_answer: list[int]
    target: list[int]
    draft_next: list[int]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(att.transpose(1, 2).reshape(b, n, d)), self.dropout, self.training)
        return x + self.mlp(self.ln2(x))


class TokenAdapter(nn.Module):
    """Causal transformer: (draft answer, target prefix, draft-next ids) -> target next-token logits."""

    def __init__(self, config: TokenAdapterConfig):
        super().__init__()
        c = self.config = config
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} must be divisible by n_heads {c.n_heads}")
        if c.vocab_limit > c.in_vocab:
            raise ValueError(f"vocab_limit {c.vocab_limit} exceeds the vocabularies ({c.in_vocab})")
        d = c.d_model
        self.tok = nn.Embedding(c.in_vocab + 3, d)
        self.role = nn.Embedding(2, d)  # 0 draft answer segment, 1 target segment
        self.pos_draft = nn.Embedding(c.max_positions, d)
        self.pos_target = nn.Embedding(c.max_positions, d)
        self.next_proj = nn.Linear(d, d, bias=False)
        self.aligned_proj = nn.Linear(d, d, bias=False)
        self.blocks = nn.ModuleList(_Block(d, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.out_bias = nn.Parameter(torch.zeros(c.vocab_limit))
        self.drop = nn.Dropout(c.dropout)
        self.apply(self._init)
        with torch.no_grad():  # start near "the draft's token is the answer"
            self.next_proj.weight.copy_(torch.eye(d))
            self.aligned_proj.weight.copy_(0.5 * torch.eye(d))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.tok.weight.device

    # ----- inputs -----
    def _ids(self, ids: Iterable[int]) -> list[int]:
        c = self.config
        return [int(t) if 0 <= int(t) < c.in_vocab else c.unk_id for t in ids]

    def collate(self, examples: Sequence[AdapterExample]) -> dict[str, torch.Tensor]:
        """Padded tensors for a batch; ``labels`` (B, N) hold the target ids (IGNORE where unpredictable)."""
        c = self.config
        drafts = [self._ids(e.draft_answer[: c.max_draft_len]) if c.use_draft_answer else [] for e in examples]
        m = max((len(d) for d in drafts), default=0)
        n = max(len(e.target) for e in examples)
        b = len(examples)
        draft = torch.full((b, m), c.none_id, dtype=torch.long)
        draft_valid = torch.zeros((b, m), dtype=torch.bool)
        prev = torch.full((b, n), c.none_id, dtype=torch.long)
        nxt = torch.full((b, n), c.none_id, dtype=torch.long)
        aligned = torch.full((b, n), c.none_id, dtype=torch.long)
        labels = torch.full((b, n), IGNORE, dtype=torch.long)
        for i, (e, d) in enumerate(zip(examples, drafts)):
            if d:
                draft[i, : len(d)] = torch.tensor(d)
                draft_valid[i, : len(d)] = True
            L = len(e.target)
            prev[i, :L] = torch.tensor([c.bos_id] + self._ids(e.target[:-1]))
            labels[i, :L] = torch.tensor([t if 0 <= t < c.vocab_limit else IGNORE for t in e.target])
            if c.use_draft_next:
                if len(e.draft_next) < L:
                    raise ValueError(f"draft_next has {len(e.draft_next)} ids for {L} target positions")
                nxt[i, :L] = torch.tensor(self._ids(e.draft_next[:L]))
            if c.use_draft_answer:
                k = min(L, len(d))
                if k:
                    aligned[i, :k] = torch.tensor(d[:k])
        return {"draft": draft, "draft_valid": draft_valid, "prev": prev, "next": nxt, "aligned": aligned,
                "labels": labels}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, N, vocab_limit) at the target positions."""
        c, dev = self.config, self.device
        draft, valid = batch["draft"].to(dev), batch["draft_valid"].to(dev)
        prev, nxt, aligned = batch["prev"].to(dev), batch["next"].to(dev), batch["aligned"].to(dev)
        b, m = draft.shape
        n = prev.shape[1]
        pos_t = torch.arange(n, device=dev).clamp(max=c.max_positions - 1)
        x_t = self.tok(prev) + self.role.weight[1] + self.pos_target(pos_t)
        if c.use_draft_next:
            x_t = x_t + self.next_proj(self.tok(nxt))
        if c.use_draft_answer:
            x_t = x_t + self.aligned_proj(self.tok(aligned))
        if m:
            pos_d = torch.arange(m, device=dev).clamp(max=c.max_positions - 1)
            x_d = self.tok(draft) + self.role.weight[0] + self.pos_draft(pos_d)
            x = torch.cat([x_d, x_t], dim=1)
            key_ok = torch.cat([valid, torch.ones((b, n), dtype=torch.bool, device=dev)], dim=1)
        else:
            x = x_t
            key_ok = torch.ones((b, n), dtype=torch.bool, device=dev)
        total = m + n
        causal = torch.ones((total, total), dtype=torch.bool, device=dev).tril()
        eye = torch.eye(total, dtype=torch.bool, device=dev)
        mask = causal[None] & (key_ok[:, None, :] | eye[None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask)
        h = self.ln_f(x[:, m:])
        return F.linear(h, self.tok.weight[: c.vocab_limit]) + self.out_bias

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over predictable positions, logits)."""
        logits = self(batch)
        labels = batch["labels"].to(logits.device)
        if not bool((labels != IGNORE).any()):
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE), logits

    @torch.no_grad()
    def next_logits(self, draft_answer: Sequence[int], context: Sequence[int],
                    draft_next: Sequence[int] = ()) -> torch.Tensor:
        """Logits (vocab_limit,) for the target token after ``context`` (``draft_next`` has len(context)+1 ids)."""
        ex = AdapterExample(list(draft_answer), [*context, -1], list(draft_next))
        return self(self.collate([ex]))[0, -1].float()

    # ----- checkpoints -----
    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        if extra:
            config["extra"] = {**config.get("extra", {}), **extra}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"model_type": MODEL_TYPE}))
        atomic_write_json(folder / CONFIG_NAME, config)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> TokenAdapter:
        """Load a checkpoint folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{folder}: not a TokenAdapter checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                                    "train one with python -m token_alignment.train_and_evaluate")
        safetensors_header(weights, "train the adapter again")  # one line for a corrupt file
        model = cls(TokenAdapterConfig.from_dict(json.loads(config_file.read_text())))
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# Live drafting
# ----------------------------------------------------------------------------------------

def masked_argmax(logits: torch.Tensor, limit: int) -> int:
    """argmax over ids < ``limit`` (what the raw drafter proposes)."""
    return int(logits[..., :limit].argmax(dim=-1).item())


def safe_draft_ids(ids: Iterable[int], limit: int, unk: int) -> list[int]:
    """Target ids as draft-model inputs: ids >= the shared base vocabulary mean other things there -> ``unk``."""
    return [int(t) if 0 <= int(t) < limit else unk for t in ids]


class SafeDraftModel:
    """A draft model whose ``forward`` maps ids outside the shared base vocabulary to its unk id.

    The target may emit ids >= the shared vocabulary (special tokens, padded rows); fed to the
    draft as context they would index past (or into other) embedding rows. It offers what a
    drafter calls on its model: ``forward`` and ``truncate``.
    """

    def __init__(self, model: Any, vocab_limit: int):
        self._model, self._limit = model, int(vocab_limit)
        tok = getattr(model, "tokenizer", None)
        unk = getattr(tok, "unk_token_id", None)
        self._unk = int(unk) if unk is not None and 0 <= int(unk) < self._limit else 0

    def forward(self, state: Any, token_ids: Any, *args, **kwargs):
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return self._model.forward(state, safe_draft_ids(ids, self._limit, self._unk), *args, **kwargs)

    def truncate(self, state: Any, length: int) -> None:
        self._model.truncate(state, length)


class TokenAdapterDrafter(SyncedDrafter):
    """Drafter protocol: proposes ``gamma`` target-space tokens from the draft's view through the adapter.

    - the draft's free-running answer ``D``: given as ``draft_tokens`` (e.g. free tokens drafted
      during the target's prefill) or generated here once from the fresh ``draft_state`` (greedy,
      ``config.draft_answer_tokens`` tokens), after which the draft cache is rolled back to the prompt;
    - with ``use_draft_next``: the draft model is kept in sync with the accepted context
      (:class:`common.speculative.SyncedDrafter`'s cache sync; its rows are the draft's next-token
      predictions ``e``) and fed each proposed token, to read ``e`` at every position.

    Proposals are the adapter's greedy tokens below ``vocab_limit``. Lossless by construction: the
    target verifies every token. ``proposals`` logs (context length, tokens, top-5 per position)
    for :meth:`top5_counts`; ``stats`` counts draft-model forwards (``steps``) like ModelDrafter.
    """

    def __init__(self, adapter: TokenAdapter, *, draft_model: Any = None, draft_state: Any = None,
                 draft_tokens: Sequence[int] | None = None, vocab_limit: int | None = None,
                 max_draft_tokens: int | None = None, stop_token_ids: Iterable[int] = (),
                 name: str = "token_adapter", sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        c = adapter.config
        self.check_fresh(draft_state, "TokenAdapterDrafter")
        first = masked_argmax(draft_state.logits, c.vocab_limit) if draft_state is not None else None
        super().__init__(first, name=name, sync=sync, clock=clock, adapter_forwards=0, answer_seconds=0.0)
        self.adapter = adapter.eval()
        self.vocab_limit = min(int(vocab_limit), c.vocab_limit) if vocab_limit is not None else c.vocab_limit
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.proposals: list[tuple[int, list[int], list[list[int]]]] = []
        needs_model = c.use_draft_next or (c.use_draft_answer and draft_tokens is None)
        if needs_model and (draft_model is None or draft_state is None):
            raise ValueError("this adapter needs the draft model and its freshly prefilled state "
                             "(draft_model=, draft_state=)")
        if draft_model is not None and int(getattr(draft_model, "vocab_size", c.draft_vocab_size)) != c.draft_vocab_size:
            warnings.warn(f"this TokenAdapter was trained for a draft model with {c.draft_vocab_size} vocabulary rows, "
                          f"not {draft_model.vocab_size}: its proposals will be poor (the output stays lossless)",
                          stacklevel=2)
        self.model = SafeDraftModel(draft_model, c.vocab_limit) if draft_model is not None else None
        self.state = draft_state
        self.draft_answer: list[int] = self._draft_answer(draft_model, draft_state, draft_tokens, max_draft_tokens)

    def _draft_answer(self, draft_model: Any, draft_state: Any, draft_tokens: Sequence[int] | None,
                      max_draft_tokens: int | None) -> list[int]:
        """The draft's free-running answer D (given, generated once here, or none when unused)."""
        c = self.adapter.config
        if not c.use_draft_answer:
            return []
        if draft_tokens is not None:
            return [int(t) for t in draft_tokens]
        start = self._now()
        n = int(max_draft_tokens or c.draft_answer_tokens)
        # the raw model, as in extraction: the draft feeds back its own tokens, special ones included
        gen = autoregressive_generate(draft_model, draft_state, max_new_tokens=n)
        self.stats.steps += gen.steps
        self.model.truncate(draft_state, draft_state.prompt_length)
        self.stats["answer_seconds"] += self._now() - start
        return list(gen.tokens)

    def _forward(self, tokens: list[int]) -> list[int]:
        logits = self.model.forward(self.state, tokens)
        return [masked_argmax(row, self.adapter.config.vocab_limit) for row in logits]

    def _truncate(self, keep: int) -> None:
        self.model.truncate(self.state, self.state.prompt_length + keep)

    def _draft(self, context: list[int], gamma: int) -> DraftProposal:
        """Up to ``gamma`` adapter tokens after ``context`` (the accepted target tokens)."""
        c = self.adapter.config
        ctx = list(context)
        tokens: list[int] = []
        tops: list[list[int]] = []
        if c.use_draft_next:
            self.sync_to(ctx)
        for i in range(gamma):
            nxt = self._rows[: len(ctx) + 1] if c.use_draft_next else []
            logits = self.adapter.next_logits(self.draft_answer, ctx, nxt)[: self.vocab_limit]
            self.stats["adapter_forwards"] += 1
            top = logits.topk(min(5, logits.shape[-1])).indices.tolist()
            token = int(top[0])
            tokens.append(token)
            tops.append(top)
            ctx.append(token)
            if token in self.stop_token_ids or i == gamma - 1:
                break
            if c.use_draft_next:
                self.sync_to(ctx)
        self.proposals.append((len(context), tokens, tops))
        return DraftProposal(tokens, None)

    def top5_counts(self, output: Sequence[int]) -> tuple[int, int]:
        """(hits, tested): draft positions the target verified (up to the first miss of each
        proposal) and how many of them had the target's token in the adapter's top 5."""
        hits = tested = 0
        for n, tokens, tops in self.proposals:
            for k, token in enumerate(tokens):
                pos = n + k
                if pos >= len(output):
                    break
                tested += 1
                hits += int(output[pos] in tops[k])
                if token != output[pos]:
                    break
        return hits, tested

    def annotate(self, result: Any) -> dict[str, Any]:
        """``result.to_dict()`` plus the live top-5 counts of this drafter (for :func:`aligned_metrics`)."""
        out = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        hits, tested = self.top5_counts(out["tokens"])
        out.update({"top5_hits": hits, "top5_tested": tested, "top5_rate": hits / tested if tested else None,
                    "draft_answer_tokens": list(self.draft_answer), "drafter_stats": dict(self.stats)})
        return out


def simulate_live_acceptance(hits: Sequence[bool], gamma: int, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The greedy speculative loop replayed on teacher-forced hits of one answer.

    ``hits[j]`` is whether the drafter's prediction for target position j, given the true
    prefix, is right. A block starting at n drafts min(gamma, budget) tokens and accepts the
    run of hits from n; the next block starts after the accepted tokens plus the target's one.
    Returns the (drafted, accepted) iterations the live engine would log (exact when the
    live predictions equal the teacher-forced ones; tokens past the answer count as misses).
    """
    length = len(hits)
    limit = length if max_new_tokens is None else max_new_tokens
    its: list[tuple[int, int]] = []
    n = 0
    while n < length:
        drafted = max(0, min(gamma, limit - n - 1))
        acc = 0
        while acc < drafted and n + acc < length and hits[n + acc]:
            acc += 1
        its.append((drafted, acc))
        n += acc + 1
    return {"iterations": its}
