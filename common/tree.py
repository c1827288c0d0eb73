"""Draft trees (EAGLE-2 style): build, mask, verify in one forward, accept, compact the KV cache.

A tree drafter proposes several continuations at once. At each depth it expands the
``topk`` most likely frontier nodes (by cumulative draft log-prob) into their ``topk``
children; at the end the ``tokens - 1`` most likely nodes are kept (the root, i.e. the
pending token the target has not processed yet, is the ``tokens``-th). Cumulative log-probs
only decrease along a path, so the kept set always holds every kept node's ancestors.

The target verifies the whole tree in ONE forward (:func:`verify_tree`): the fed rows are
the pending token(s) then the nodes (parents before children); each node attends to the
cache, the pending tokens, its ancestors and itself (:func:`tree_attention_mask`) and sits
at rotary position ``prefix + depth`` (:func:`tree_positions`). The accepted path's KV
entries are then moved to consecutive positions after the prefix and the rest is dropped
(:func:`compact_cache`).

Lossless, as the chain engine in :mod:`common.speculative`:

- temperature 0: walk down from the root while a child's token equals the target's argmax
  at its parent; the next token is the target's argmax there;
- temperature > 0: at each node try its children in order (recursive rejection sampling):
  with ``q`` unknown (deterministic top-k children, as EAGLE-2 builds them) accept child
  ``x`` with probability ``p(x)``, else set ``p(x) = 0`` and renormalise; with ``q`` given
  (children drawn WITHOUT replacement from ``q``) accept with ``min(1, p(x)/q(x))``, else
  ``p := norm(max(0, p - q))`` and ``q := q`` without ``x``, renormalised. When no child is
  accepted the next token is drawn from the final ``p``. Either way the emitted token has
  exactly the target's distribution.

Everything here is a pure function over plain tensors and lists (testable with fakes);
:func:`common.speculative.speculative_generate` runs it when given a :class:`TreeConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.flags import add_tree_args  # noqa: F401  (re-exported: the flags live there)
from common.sampling import is_greedy, probs_from_logits, sample_from_probs, uniform

__all__ = [
    "TreeConfig", "DraftTree", "build_tree", "tree_attention_mask", "tree_positions", "accept_tree_greedy",
    "accept_tree_sampled", "compact_cache", "verify_tree", "add_tree_args", "tree_config_from",
    "propose_tree", "tree_from_flags", "tree_summary", "TREE_DRAFTERS", "tree_row_map",
]

# Drafter kinds that draft trees (EagleDrafter.propose_tree; the hybrid's EAGLE phase after the prefill).
TREE_DRAFTERS = ("eagle", "hybrid")


@dataclass(frozen=True)
class TreeConfig:
    """``topk`` children per expanded node, ``tokens`` rows per verify (root included), optional max ``depth``."""

    topk: int
    tokens: int
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"--tree_topk must be >= 1, got {self.topk}")
        if self.tokens < 2:
            raise ValueError(f"--tree_tokens must be >= 2 (the root plus at least one draft node), got {self.tokens}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"--tree_depth must be >= 1, got {self.depth}")

    @property
    def nodes(self) -> int:
        """Draft nodes per tree (the root is the pending token, not drafted)."""
        return self.tokens - 1

    @property
    def max_depth(self) -> int:
        """Deepest level ever expanded (default: a chain of all nodes)."""
        return min(self.depth or self.nodes, self.nodes)


@dataclass
class DraftTree:
    """Nodes in creation order (a parent always before its children; siblings in trial order).

    ``parents[i]`` is the parent node's index, -1 for the root's children. ``scores`` are the
    cumulative draft log-probs. ``probs`` maps a parent (-1 = root) to the distribution its
    children were drawn from WITHOUT replacement; leave it empty for deterministic (top-k)
    children.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        """Depth of every node (the root's children are at depth 1)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    @property
    def depth(self) -> int:
        """Depth of the deepest node (0 for an empty tree)."""
        return max(self.depths, default=0)

    def children(self, node: int) -> list[int]:
        """Indices of ``node``'s children (-1: the root's) in trial order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_tokens(self, node: int) -> list[int]:
        """Tokens from the root's child down to ``node`` (empty for the root)."""
        out: list[int] = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def select(self, keep: Sequence[int]) -> DraftTree:
        """The sub-tree of nodes ``keep`` (ancestor-closed), re-indexed in their original order."""
        order = sorted(set(int(i) for i in keep))
        where = {old: new for new, old in enumerate(order)}
        if any(self.parents[i] >= 0 and self.parents[i] not in where for i in order):
            raise ValueError("a kept tree node's parent was dropped")
        parents = [where[self.parents[i]] if self.parents[i] >= 0 else -1 for i in order]
        probs = {(where[k] if k >= 0 else -1): v for k, v in self.probs.items() if k < 0 or k in where}
        return DraftTree([self.tokens[i] for i in order], parents,
                         [self.scores[i] for i in order] if self.scores else [], probs)

    def limited(self, max_depth: int) -> DraftTree:
        """Nodes no deeper than ``max_depth``."""
        depths = self.depths
        if all(d <= max_depth for d in depths):
            return self
        return self.select([i for i, d in enumerate(depths) if d <= max_depth])


# ----------------------------------------------------------------------------------------
# Building (EAGLE-2): expand the top-k frontier, keep the most likely nodes
# ----------------------------------------------------------------------------------------

# A frontier's children: (len, V) log-probs, or per row its top-k already taken as host lists (values, ids),
# descending as ``torch.topk`` returns them (a static expansion reads them in one device-to-host copy).
TopK = tuple[Sequence[float], Sequence[int]]
Expand = Callable[[DraftTree, list[int]], "torch.Tensor | Sequence[TopK]"]


def _add_children(tree: DraftTree, parent: int, base: float, logprobs: torch.Tensor | TopK, k: int) -> list[int]:
    if isinstance(logprobs, torch.Tensor):
        values, ids = torch.topk(logprobs.float(), min(k, int(logprobs.shape[-1])))
        logprobs = (values.tolist(), ids.tolist())
    added = []
    for v, t in zip(*logprobs):
        if math.isfinite(v):
            tree.tokens.append(int(t))
            tree.parents.append(parent)
            tree.scores.append(base + v)
            added.append(len(tree.tokens) - 1)
    return added


def build_tree(root_logprobs: torch.Tensor | TopK, expand: Expand, config: TreeConfig, *,
               max_depth: int | None = None, stop_tokens: frozenset[int] = frozenset()) -> DraftTree:
    """EAGLE-2 tree from the draft's log-probs at the root and ``expand(tree, frontier) -> (len, V)`` log-probs
    (or, for both, the top-k already taken: ``TopK`` host lists, see ``Expand``).

    Depth 1 holds the root's top-k; each further depth expands the top-k nodes of the previous
    depth (by cumulative log-prob; stop tokens are never expanded) into their top-k children.
    Expansion stops at ``max_depth`` or once no frontier node can enter the final selection;
    then the ``config.nodes`` best nodes are kept (ties: the shallower / earlier node).
    """
    k, budget = config.topk, config.nodes
    limit = min(config.max_depth, max_depth if max_depth is not None else config.max_depth)
    tree = DraftTree()
    if limit < 1:
        return tree
    level = _add_children(tree, -1, 0.0, root_logprobs, k)
    for _ in range(1, limit):
        frontier = sorted((i for i in level if tree.tokens[i] not in stop_tokens),
                          key=lambda i: (-tree.scores[i], i))[:k]
        if not frontier:
            break
        if len(tree) >= budget and sorted(tree.scores, reverse=True)[budget - 1] >= tree.scores[frontier[0]]:
            break  # every descendant scores <= its frontier ancestor: none could be kept
        logprobs = expand(tree, frontier)
        level = [c for row, i in enumerate(frontier)
                 for c in _add_children(tree, i, tree.scores[i], logprobs[row], k)]
    best = sorted(range(len(tree)), key=lambda i: (-tree.scores[i], i))[:budget]
    return tree.select(best)


def propose_tree(drafter: Any, context: list[int], config: TreeConfig, max_depth: int) -> DraftTree:
    """``drafter.propose_tree(context, config, max_depth)``, or one line saying it drafts chains only."""
    fn = getattr(drafter, "propose_tree", None)
    if fn is None:
        raise ValueError(f"drafter {getattr(drafter, 'name', type(drafter).__name__)!r} drafts chains only: "
                         "drop --tree_topk/--tree_tokens or use --drafter eagle")
    return fn(context, config, max_depth)


# ----------------------------------------------------------------------------------------
# Verification: mask, positions, acceptance, compaction
# ----------------------------------------------------------------------------------------

def tree_attention_mask(parents: Sequence[int], prefix: int, pending: int = 1,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (pending + n, prefix + pending + n): who each fed row may attend to.

    Pending rows are causal among themselves; node rows see the prefix, every pending row,
    their ancestors and themselves.

    Only the (rows, rows) block of the fed rows is built on the host, with ops too small for ATen's
    thread pool; the prefix's columns are filled on ``device``. (Host fills past ATen's parallel grain
    and ``tril``, which always runs on the pool, cost 8-28 ms per verify in OpenMP barriers on a GPU
    host whose cores were busy elsewhere; the forward itself takes ~6 ms.)
    """
    n = len(parents)
    rows = pending + n
    fed = torch.zeros((rows, rows), dtype=torch.bool)
    fed[:, :pending] = torch.arange(pending)[None, :] <= torch.arange(rows)[:, None]  # causal among pending
    for i, parent in enumerate(parents):
        r = pending + i
        fed[r, r] = True
        if parent >= 0:
            fed[r] |= fed[pending + parent]
    mask = torch.ones((rows, prefix + rows), dtype=torch.bool, device=device)
    mask[:, prefix:] = fed.to(device)
    return mask


def tree_positions(parents: Sequence[int], prefix: int, pending: int = 1,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Rotary positions of the fed rows: pending at ``prefix + i``, a node at ``prefix + pending - 1 + depth``."""
    depths = DraftTree(parents=list(parents), tokens=[0] * len(parents)).depths
    out = list(range(prefix, prefix + pending)) + [prefix + pending - 1 + d for d in depths]
    return torch.tensor(out, dtype=torch.long, device=device)


def tree_row_map(attn_mask: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor | None:
    """Fed row whose key each fed row reads at each virtual position: (k, k) long, or None.

    For a tree verify (:func:`tree_attention_mask`, :func:`tree_positions` at cache length
    ``start``), row r at position ``start + d`` attends the fed rows at positions start..start + d:
    ``map[r, j]`` is the fed row at ``start + j`` on r's path (its pending rows and ancestors, in
    order); past ``position_ids[r]`` it is j. None when the mask is not of that form (a hidden cache
    position, or a row whose visible fed rows do not fill its positions), so the caller runs eagerly.

    The (k, k) map is worked out on the host from one device read (the fed block, the positions and
    whether the prefix is all visible), with ops too small for ATen's thread pool.
    """
    k = attn_mask.shape[0]
    if tuple(attn_mask.shape) != (k, start + k) or tuple(position_ids.shape) != (k,):
        return None
    packed = torch.cat([attn_mask[:, start:].long(), (position_ids.reshape(k, 1) - start).long(),
                        attn_mask[:, :start].all().long().expand(k, 1)], dim=1).cpu()  # one host read
    fed, depth, prefix_seen = packed[:, :k], packed[:, k], bool(packed[0, k + 1])
    seen = fed.cumsum(1) - 1  # where each visible fed row sits on the row's path
    if not (prefix_seen and bool((seen[:, -1] == depth).all()) and bool(fed.diagonal().all())):
        return None
    cols = torch.arange(k)
    out = torch.cat([cols.expand(k, k), cols.new_zeros((k, 1))], dim=1)  # a spare column takes the hidden rows
    out.scatter_(1, torch.where(fed.bool(), seen, k), cols.expand(k, k))
    return out[:, :k].to(attn_mask.device)


def accept_tree_greedy(tree: DraftTree, root: torch.Tensor, rows: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose tokens equal the target's argmax at each parent; (node path, next token).

    ``root`` (V,) are the target's logits at the root, ``rows`` (n, V) at each node. Every row's argmax
    is read to the host at once (one device read per verify, not one per accepted token).
    """
    best = torch.cat([root.reshape(-1).argmax().reshape(1), rows.argmax(-1)]).tolist()  # root, then node i at 1 + i
    path: list[int] = []
    node = -1
    while True:
        want = best[1 + node]
        child = next((c for c in tree.children(node) if tree.tokens[c] == want), None)
        if child is None:
            return path, want
        path.append(child)
        node = child


def _reject(p: torch.Tensor, q: torch.Tensor | None, token: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residuals after rejecting ``token``: p := norm(max(0, p - q)), q := q without ``token``."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
        q = q.clone()
        q[token] = 0.0
        q = q / q.sum() if float(q.sum()) > 0 else q
    if float(residual.sum()) <= 0.0:  # only through rounding (p == q)
        return p, q
    return residual / residual.sum(), q


def accept_tree_sampled(tree: DraftTree, root: torch.Tensor, rows: torch.Tensor, temperature: float,
                        generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Recursive rejection sampling over siblings (see the module doc); (node path, next token)."""
    device = generator.device if generator is not None else root.device
    path: list[int] = []
    node, logits = -1, root
    while True:
        p = probs_from_logits(logits, temperature).to(device)
        q = tree.probs.get(node)
        q = None if q is None else q.float().to(device)[: p.shape[-1]]
        accepted = None
        for child in tree.children(node):
            x = tree.tokens[child]
            qx = 1.0 if q is None else float(q[x])
            px = float(p[x])
            ratio = px / qx if qx > 0 else (math.inf if px > 0 else 0.0)
            if ratio >= 1.0 or uniform(generator) < ratio:
                accepted = child
                break
            p, q = _reject(p, q, x)
        if accepted is None:
            return path, sample_from_probs(p, generator)
        path.append(accepted)
        node, logits = accepted, rows[accepted]


def compact_cache(keys: torch.Tensor, values: torch.Tensor, start: int, keep: Sequence[int], dim: int = 3) -> None:
    """Move positions ``start + keep[i]`` to ``start + i`` along ``dim`` (in place; ``keep`` ascending)."""
    keep = [int(k) for k in keep]
    if keep == list(range(len(keep))):
        return
    src = torch.tensor([start + k for k in keep], dtype=torch.long, device=keys.device)
    dst = torch.arange(start, start + len(keep), device=keys.device)
    for t in (keys, values):
        t.index_copy_(dim, dst, t.index_select(dim, src))


def verify_tree(target: Any, state: Any, pending: list[int], tree: DraftTree, temperature: float,
                generator: torch.Generator | None = None) -> tuple[list[int], int, int]:
    """Feed ``pending + tree`` in one forward with the tree mask, accept a path, compact the cache.

    ``target`` needs ``forward(state, ids, attn_mask=, position_ids=)`` (mask (k, length + k)
    over the cache plus the fed rows) and ``compact(state, start, keep)`` (keep fed rows
    ``keep`` at ``start``, ``start + 1``, ...; drop the rest). Returns (accepted tokens, next
    token, target forwards).
    """
    vocab = int(target.vocab_size)
    if any(t < 0 or t >= vocab for t in tree.tokens):
        raise ValueError(f"draft token outside the target vocabulary [0, {vocab}): {tree.tokens}")
    base, np_ = state.length, len(pending)
    root = state.logits.reshape(-1) if not pending else None
    forwards = 0
    if pending or len(tree):
        device = getattr(target, "device", "cpu")
        if not len(tree):  # nothing drafted: a plain forward (the fast path, graphs included)
            logits = target.forward(state, pending)
        else:
            logits = target.forward(state, pending + tree.tokens,
                                    attn_mask=tree_attention_mask(tree.parents, base, np_, device),
                                    position_ids=tree_positions(tree.parents, base, np_, device))
        forwards = 1
        root = logits[np_ - 1] if pending else root
        rows = logits[np_:]
    else:
        rows = root.new_zeros((0, root.shape[-1]))
    if is_greedy(temperature):
        path, nxt = accept_tree_greedy(tree, root, rows)
    else:
        path, nxt = accept_tree_sampled(tree, root, rows, temperature, generator)
    if forwards:
        keep = list(range(np_)) + [np_ + j for j in path]
        target.compact(state, base, keep)
        if keep:
            state.logits = logits[keep[-1]]
    return [tree.tokens[j] for j in path], nxt, forwards


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def tree_config_from(topk: int | None, tokens: int | None, depth: int | None = None) -> TreeConfig | None:
    """The TreeConfig of the tree flags, None when all are off; one-line errors otherwise."""
    if topk is None and tokens is None:
        if depth is not None:
            raise ValueError("--tree_depth caps a draft tree: pass it with --tree_topk and --tree_tokens "
                             "(e.g. --tree_topk 4 --tree_tokens 16 --tree_depth 6)")
        return None
    if topk is None or tokens is None:
        raise ValueError("--tree_topk and --tree_tokens go together: pass both (e.g. --tree_topk 4 --tree_tokens 6)")
    return TreeConfig(topk=int(topk), tokens=int(tokens), depth=None if depth is None else int(depth))


def tree_summary(config: TreeConfig) -> dict[str, int]:
    """The flags a run drafted its trees with, for results: topk, tokens and, when capped, depth."""
    return {"topk": config.topk, "tokens": config.tokens, **({"depth": config.depth} if config.depth else {})}


def tree_from_flags(topk: int | None, tokens: int | None, drafters: Sequence[str],
                    depth: int | None = None) -> TreeConfig | None:
    """For CLIs: the flags' TreeConfig when every drafter kind in ``drafters`` drafts trees; one-line SystemExit otherwise."""
    try:
        config = tree_config_from(topk, tokens, depth)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    refused = [d for d in drafters if d not in TREE_DRAFTERS]
    if config is not None and (refused or not drafters):
        what = f"drafter {refused[0]!r} drafts chains only" if refused else "no chosen drafter drafts trees"
        raise SystemExit(f"--tree_topk/--tree_tokens: {what}; trees need one of {', '.join(TREE_DRAFTERS)} "
                         "(e.g. --drafter eagle --eagle_head PATH)")
    return config
