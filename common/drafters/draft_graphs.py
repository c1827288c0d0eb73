"""Graphed draft chains: an EAGLE head's commit and its whole gamma-step chain as one CUDA-graph replay each.

Eagerly, a proposal of gamma tokens costs one launch-bound head step per token plus a host read
per token (``int(argmax)``). :class:`HeadChain` runs the same math at fixed shapes over a static
head cache, so each part replays as one CUDA graph:

- ``commit(features, tokens)``: the accepted context's true target rows, padded to
  ``commit_size`` rows (longer inputs run as consecutive padded steps). Padded rows sit at
  positions past the real ones, so no real row attends them, and later rows overwrite them.
- ``chain(root, gamma)``: :func:`draft_chain` unrolled, argmax on the device, each drafted
  token and predicted feature fed back at temporary positions after the cache's length (the
  length does not move: they are dropped). The host reads the gamma tokens once.
- ``tree(root, config, max_depth)``: an EAGLE-2 draft tree (:func:`common.tree.build_tree`, host
  bookkeeping unchanged) whose root and per-depth k-row expansions are fixed-shape steps
  (:class:`HeadTree`: one replay and one host read per depth), at temporary positions as the chain's.
  Its head needs ``static_step``'s ``slots`` and ``attn_mask`` (the EAGLE head has them).

Every input is a static buffer filled before the replay (features, ids, positions, the root
feature, the start position). With ``graphs=False`` the same functions run eagerly on the same
buffers (the CPU path and the reference the CUDA graphs must equal bitwise). Captures warm up on a
side stream and hold ``common.timing.CAPTURE_LOCK`` (:func:`common.models.decoder.capture_graph`);
their warm-up writes at the end of the capacity, never over live positions.

The head is duck-typed: ``static_step``, ``logits``, ``new_cache``, ``feature_size`` and ``fc`` (its
weight's device and dtype are the buffers'), so the same graphs serve the EAGLE head
(``common.drafters.eagle_head.EagleHead``) and the L5 adapter's trunk
(``common.drafters.hidden_adapter.L5Trunk``); this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.models.decoder import capture_graph, graph_replay_ms
from common.tree import DraftTree, TreeConfig, build_tree

__all__ = ["HeadChain", "HeadTree", "StaticKV", "draft_chain", "expand_topk", "CHAIN_MODES", "pick_chain_mode",
           "plain_weights", "cut_after_stop"]

CHAIN_MODES = ("auto", "eager", "static", "graph")


def plain_weights(*modules: Any) -> bool:
    """Whether every module is a floating-point tensor, ``nn.Linear`` or ``nn.Embedding`` (safe to graph;
    quantized layers are not); a twin's ``VocabLimitedHead`` counts as the ``nn.Linear`` it wraps."""
    from common.models.decoder import VocabLimitedHead

    modules = tuple(m.head if isinstance(m, VocabLimitedHead) else m for m in modules)
    return all(isinstance(m, (torch.Tensor, torch.nn.Linear, torch.nn.Embedding)) and
               (m if isinstance(m, torch.Tensor) else m.weight).is_floating_point() for m in modules)


def pick_chain_mode(mode: str, on_cuda: bool, graphable: bool) -> str:
    """A drafter's chain mode: ``eager`` (its own eager steps: the reference), ``static`` (the fixed-shape
    chain run eagerly), ``graph`` (that chain as CUDA graphs); ``auto`` is graph when ``on_cuda`` and
    ``graphable`` (plain weights and a model that decodes with CUDA graphs), else eager."""
    if mode not in CHAIN_MODES:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_MODES)}, got {mode!r}")
    if mode == "graph" and not on_cuda:
        raise ValueError("chain='graph' needs the drafter on a CUDA device (use 'static' or 'eager' on CPU)")
    if mode != "auto":
        return mode
    return "graph" if on_cuda and graphable else "eager"


def cut_after_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (what an eager chain would have drafted)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def _capture(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Any, torch.Tensor]:
    """``fn`` (reading only static buffers) as a CUDA graph without autograd; (graph, its output)."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return capture_graph(run, device, warmup=2)


class StaticKV:
    """Keys and values (layers, heads, capacity, head_dim) and a filled ``length``; never grows."""

    def __init__(self, layers: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.keys = torch.zeros((layers, heads, capacity, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


def draft_chain(head: Any, root: torch.Tensor, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                gamma: int) -> torch.Tensor:
    """``gamma`` greedy draft tokens (gamma,) from the ``root`` feature (H,), fixed shapes, no host reads.

    Token i is the argmax of the LM head on feature i; feature i + 1 is the head's step on
    (feature i, token i) at position ``start + i`` (``start`` a (1,) device tensor) of ``keys``/``values``.
    """
    feature = root.reshape(1, -1)
    tokens = []
    for i in range(gamma):
        token = head.logits(feature[0]).argmax(dim=-1, keepdim=True)
        tokens.append(token)
        if i < gamma - 1:
            feature = head.static_step(feature, token, start + i, keys, values)
    return torch.cat(tokens)


class HeadChain:
    """A head's static cache, input buffers and (with ``graphs``) the CUDA graphs of its commit and chain.

    ``capacity`` head positions are fixed (the cache never grows: check :meth:`fits` first); ``owner``
    says which drafter's context the cache holds (drafters sharing one head take it over in turn).
    """

    def __init__(self, head: Any, capacity: int, commit_size: int, graphs: bool):
        if graphs and head.fc.weight.device.type != "cuda":
            raise ValueError("CUDA graphs of the draft chain need the head on a CUDA device")
        self.head = head
        self.cache = head.new_cache(int(capacity))
        self.commit_size = max(int(commit_size), 1)
        self.graphs = bool(graphs)
        self.owner: object | None = None
        p = head.fc.weight
        self.device = p.device
        hidden = int(head.feature_size)
        self._feats = torch.zeros((self.commit_size, hidden), dtype=p.dtype, device=p.device)
        self._index = torch.zeros(2 * self.commit_size, dtype=torch.long, device=p.device)  # [ids | positions]
        self._root = torch.zeros(hidden, dtype=p.dtype, device=p.device)
        self._start = torch.zeros(1, dtype=torch.long, device=p.device)
        self._commit_graph: tuple[Any, torch.Tensor] | None = None
        self._chain_graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._trees: dict[tuple[int, int], HeadTree] = {}  # (topk, width) -> its buffers and graphs
        self._key_ptr = self.cache.keys.data_ptr()

    @property
    def capacity(self) -> int:
        return int(self.cache.keys.shape[2])

    def valid(self) -> bool:
        """False once someone grew the cache (its graphs would read freed memory)."""
        return self.cache.keys.data_ptr() == self._key_ptr

    def fits(self, rows: int) -> bool:
        """Whether ``rows`` more positions fit after the cache's length (and the cache is still the captured one)."""
        return self.valid() and self.cache.length + max(int(rows), 0) <= self.capacity

    def claim(self, owner: object) -> None:
        """Hand the cache to ``owner`` (emptied)."""
        self.owner = owner
        self.cache.truncate(0)

    def step(self, feature: torch.Tensor, token: int) -> torch.Tensor:
        """One row at the cache's end, eagerly, with the chain's kernels (the root path for context tokens
        the target has not verified yet); returns the (H,) next feature."""
        if not self.fits(1):
            raise ValueError(f"the static head cache is full ({self.capacity} positions); check fits() first")
        position = torch.tensor([self.cache.length], device=self.device)
        ids = torch.tensor([int(token)], device=self.device)
        out = self.head.static_step(feature.reshape(1, -1), ids, position, self.cache.keys, self.cache.values)
        self.cache.length += 1
        return out[0]

    # ----- the captured functions (they read only the static buffers) -----
    def _commit_fn(self) -> torch.Tensor:
        size = self.commit_size
        return self.head.static_step(self._feats, self._index[:size], self._index[size:], self.cache.keys,
                                     self.cache.values)

    def _chain_fn(self, gamma: int) -> Callable[[], torch.Tensor]:
        return lambda: draft_chain(self.head, self._root, self._start, self.cache.keys, self.cache.values, gamma)

    def _capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        return _capture(fn, self.device)

    # ----- commit -----
    def commit(self, features: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """Append k rows ((k, H) true features, k tokens) at the cache's end; (k, H) head outputs (a copy)."""
        tokens = [int(t) for t in tokens]
        size = self.commit_size
        if not self.fits(size * -(-len(tokens) // size)):  # the last step's padded rows must fit too
            raise ValueError(f"{len(tokens)} rows do not fit the static head cache ({self.cache.length} of "
                             f"{self.capacity} positions used); check fits() first")
        outs = [self._commit_chunk(features[i:i + size], tokens[i:i + size]) for i in range(0, len(tokens), size)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _commit_chunk(self, features: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        k, start = len(tokens), self.cache.length
        self._ensure_commit_graph()
        self._prepare(start, tokens, features)
        if self.graphs:
            graph, out = self._commit_graph
            with torch.cuda.device(self.device):
                graph.replay()
        else:
            out = self._commit_fn()
        self.cache.length = start + k
        return out[:k].clone()

    def _prepare(self, start: int, tokens: list[int], features: torch.Tensor | None = None) -> None:
        """Fill the commit buffers with k rows at ``start``; padded rows are zero features, id 0, the next positions."""
        size, k = self.commit_size, len(tokens)
        if k < size:
            self._feats.zero_()
        if k:
            self._feats[:k].copy_(features.reshape(k, -1))
        host = torch.tensor(tokens + [0] * (size - k) + list(range(start, start + size)), dtype=torch.long)
        self._index.copy_(host)  # one host-to-device copy: ids and positions

    def _ensure_commit_graph(self) -> None:
        if self.graphs and self._commit_graph is None:
            self._prepare(self.capacity - self.commit_size, [])  # the capture's warm-up writes at the end
            self._commit_graph = self._capture(self._commit_fn)

    # ----- chain -----
    def chain(self, root: torch.Tensor, gamma: int) -> list[int]:
        """``gamma`` greedy tokens from ``root`` (H,), fed back at temporary positions; the length is unchanged."""
        gamma = int(gamma)
        if gamma <= 0:
            return []
        size = self._chain_size(gamma)
        if not self.fits(size - 1):
            raise ValueError(f"a chain of {gamma} tokens does not fit the static head cache ({self.cache.length} of "
                             f"{self.capacity} positions used); check fits() first")
        self._root.copy_(root.reshape(-1))
        self._start.fill_(self.cache.length)
        if self.graphs:
            graph, out = self._chain_graphs[size]
            with torch.cuda.device(self.device):
                graph.replay()
        else:
            out = self._chain_fn(gamma)()
        return out[:gamma].tolist()  # the one host read of the proposal

    def _chain_size(self, gamma: int) -> int:
        """The chain length to run: eagerly gamma; graphed the smallest captured >= gamma (captured if none)."""
        if not self.graphs:
            return gamma
        fitting = [s for s in self._chain_graphs if s >= gamma and self.fits(s - 1)]
        if fitting:
            return min(fitting)
        if not self.fits(gamma - 1):
            return gamma  # chain() refuses it
        self._start.fill_(self.capacity - gamma + 1)  # the capture's warm-up writes at the end of the capacity
        self._chain_graphs[gamma] = self._capture(self._chain_fn(gamma))
        return gamma

    def replay_ms(self, gamma: int, repeats: int = 50) -> dict[str, float]:
        """GPU ms of one commit replay and one ``gamma`` chain replay (CUDA events; graphs only).

        Replays run at the cache's end positions, past its live length, so the cache is unharmed.
        """
        from common.models.decoder import graph_replay_ms

        if not self.graphs:
            raise ValueError("replay_ms needs graphs=True")
        size = self._chain_size(gamma)
        self._ensure_commit_graph()
        self._prepare(self.capacity - self.commit_size, [])
        self._start.fill_(self.capacity - size + 1)
        return {"commit_ms": graph_replay_ms(self._commit_graph[0], self.device, repeats),
                "chain_ms": graph_replay_ms(self._chain_graphs[size][0], self.device, repeats)}

    # ----- draft trees -----
    def tree(self, root: torch.Tensor, config: TreeConfig, max_depth: int,
             stop_tokens: frozenset[int] = frozenset()) -> tuple[DraftTree, int]:
        """``common.tree.build_tree`` from ``root`` (H,) with static k-row expansions (:class:`HeadTree`) at
        temporary positions after the cache's length (the length is unchanged); (tree, expansions run)."""
        return self._tree(config).build(root, config, max_depth, stop_tokens)

    def _tree(self, config: TreeConfig) -> HeadTree:
        key = (int(config.topk), max(config.max_depth - 1, 1))  # ancestors: at most one per expansion
        if key not in self._trees:
            self._trees[key] = HeadTree(self, *key)
        return self._trees[key]

    def tree_replay_ms(self, config: TreeConfig, repeats: int = 50) -> dict[str, float]:
        """GPU ms of a tree's root replay and of one expansion replay (CUDA events; graphs only), at the
        capacity's end slots (the cache is unharmed)."""
        if not self.graphs:
            raise ValueError("tree_replay_ms needs graphs=True")
        return self._tree(config).replay_ms(repeats)

    def tree_rows(self, config: TreeConfig, max_depth: int) -> int:
        """Head positions a tree of ``config`` (at most ``max_depth`` deep) uses past the cache's length."""
        return int(config.topk) * max(min(config.max_depth, int(max_depth)) - 1, 0)


def expand_topk(head: Any, features: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 2k') float64: per row of ``features`` the top-k' (k' = min(k, V)) draft log-probs of the LM
    head, then their ids (exact as float64), as ``build_tree`` takes them eagerly (float32 log_softmax)."""
    logprobs = torch.log_softmax(head.logits(features), dim=-1).float()
    values, ids = torch.topk(logprobs, min(int(k), int(logprobs.shape[-1])), dim=-1)
    return torch.cat([values.double(), ids.double()], dim=-1)


def _rows_topk(top: list[list[float]]) -> list[tuple[list[float], list[int]]]:
    """The host lists of :func:`expand_topk`'s rows: (values, ids) per row."""
    half = len(top[0]) // 2 if top else 0
    return [(row[:half], [int(t) for t in row[half:]]) for row in top]


class HeadTree:
    """EAGLE-2 draft trees on a :class:`HeadChain`'s static cache, one fixed-shape step per depth.

    ``build`` runs :func:`common.tree.build_tree` (the eager path stays the reference and decides
    everything on the host); each depth's expansion is one k-row step: the frontier's parent features
    gathered on the device from the previous step's outputs (row 0: the root), the head's
    ``static_step`` at rotary position ``length + depth - 1`` with an ancestor mask over the whole
    capacity, the LM head, log_softmax and top-k per row (:func:`expand_topk`). With ``graphs`` it is one
    CUDA-graph replay; the host writes one small index buffer and reads the (k, 2k) result once.

    Expansion i's rows (padded to k) write at slots ``length + i*k + row`` past the cache's length
    (temporary, dropped with the tree); a padded row sees only its own slot and the context, and no
    real row sees it. Index buffer: [ids | positions | slots | parent rows | ancestor slots (k, width) |
    length]; ``width`` is the most expansions a tree of the config runs (ancestors padded with the own slot).
    """

    def __init__(self, chain: HeadChain, topk: int, width: int):
        self.chain, self.k, self.width = chain, int(topk), int(width)
        p = chain.head.fc.weight
        self._src = torch.zeros((self.k + 1, int(chain.head.feature_size)), dtype=p.dtype, device=p.device)
        self._index = torch.zeros(4 * self.k + self.k * self.width + 1, dtype=torch.long, device=p.device)
        self._graphs: list[tuple[Any, torch.Tensor]] = []  # [root, expansion] with graphs

    # ----- the captured functions (they read only the static buffers) -----
    def _root_fn(self) -> torch.Tensor:
        return expand_topk(self.chain.head, self._src[:1], self.k)

    def _expand_fn(self) -> torch.Tensor:
        k, idx, cache = self.k, self._index, self.chain.cache
        capacity = cache.keys.shape[2]
        mask = (torch.arange(capacity, device=idx.device)[None, :] < idx[-1:, None]).repeat(k, 1)
        mask.scatter_(1, idx[4 * k:4 * k + k * self.width].view(k, self.width), True)
        feats = self._src.index_select(0, idx[3 * k:4 * k])
        out = self.chain.head.static_step(feats, idx[:k], idx[k:2 * k], cache.keys, cache.values,
                                          slots=idx[2 * k:3 * k], attn_mask=mask)
        self._src[1:].copy_(out)
        return expand_topk(self.chain.head, out, k)

    def _fill(self, ids: list[int], positions: list[int], slots: list[int], rows: list[int],
              ancestors: list[list[int]], base: int) -> None:
        """One host-to-device copy of the expansion's inputs (each list padded to k rows by the caller)."""
        flat = [a for row in ancestors for a in row]
        self._index.copy_(torch.tensor(ids + positions + slots + rows + flat + [base], dtype=torch.long))

    def _park(self) -> None:
        """Inputs that write only at the capacity's last k slots (captures' warm-ups, replay timing)."""
        k, end = self.k, self.chain.capacity
        slots = list(range(end - k, end))
        self._fill([0] * k, [end - 1] * k, slots, [0] * k, [[s] * self.width for s in slots], 0)

    def _ensure_graphs(self) -> None:
        if self.chain.graphs and not self._graphs:
            self._park()
            self._graphs = [_capture(self._root_fn, self.chain.device), _capture(self._expand_fn, self.chain.device)]

    def _run(self, part: int) -> list[tuple[list[float], list[int]]]:
        """Run the root (0) or expansion (1) step; its rows read to the host at once."""
        if self.chain.graphs:
            graph, out = self._graphs[part]
            with torch.cuda.device(self.chain.device):
                graph.replay()
        else:
            out = (self._root_fn, self._expand_fn)[part]()
        return _rows_topk(out.tolist())

    def replay_ms(self, repeats: int) -> dict[str, float]:
        """GPU ms of one root and one expansion replay, parked at the capacity's end slots."""
        self._ensure_graphs()
        self._park()
        root, expand = (graph_replay_ms(g, self.chain.device, repeats) for g, _ in self._graphs)
        return {"root_ms": root, "expand_ms": expand}

    # ----- a tree -----
    def build(self, root: torch.Tensor, config: TreeConfig, max_depth: int,
              stop_tokens: frozenset[int]) -> tuple[DraftTree, int]:
        """The tree ``build_tree`` makes from ``root`` (H,); (tree, expansions run)."""
        chain, k = self.chain, self.k
        if not chain.fits(chain.tree_rows(config, max_depth)):
            raise ValueError(f"a tree of {config} does not fit the static head cache ({chain.cache.length} of "
                             f"{chain.capacity} positions used); check fits(tree_rows()) first")
        self._ensure_graphs()
        base = chain.cache.length
        self._src[0].copy_(root.reshape(-1))
        slots: dict[int, int] = {}  # node -> its head cache slot (once expanded)
        rows: dict[int, int] = {-1: -1}  # node -> its row in the last expansion (its output: _src[1 + row])
        count = [0]

        def expand(tree: DraftTree, frontier: list[int]) -> list[tuple[list[float], list[int]]]:
            i, n = count[0], len(frontier)  # expansion i: the frontier's depth is i + 1
            count[0] += 1
            own = [base + i * k + r for r in range(k)]
            ancestors = [[s] * self.width for s in own]  # padded with the own slot
            for r, node in enumerate(frontier):
                slots[node] = own[r]
                up, depth = node, 0
                while up >= 0:  # the node and its ancestors, all expanded
                    ancestors[r][depth] = slots[up]
                    up, depth = tree.parents[up], depth + 1
            parents = [1 + rows[tree.parents[j]] for j in frontier] + [0] * (k - n)
            rows.clear()
            rows.update({node: r for r, node in enumerate(frontier)})
            rows[-1] = -1
            self._fill([tree.tokens[j] for j in frontier] + [0] * (k - n), [base + i] * k, own, parents,
                       ancestors, base)
            return self._run(1)[:n]

        tree = build_tree(self._run(0)[0], expand, config, max_depth=max_depth, stop_tokens=stop_tokens)
        return tree, count[0]
