"""The per-model timing steps of the real-shape benchmarks (shared by real_shape_benchmark and engine_report).

Inputs of the real shapes, decode ms/token, verify(k)/decode(1), a 16-row draft tree's verify/decode(1) (the
target's forward alone, and the EAGLE route's whole verify step), and transformers' ``generate``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from common.timing import sync

QUESTION = "What are the key elements in this scene?"


def timed_median(fn, repeats: int, device) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over repeats (after one warm-up), and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def raw_inputs(kind: str) -> Any:
    """Random frames of the real input sizes (5 event frames, or 8 video frames)."""
    rng = np.random.default_rng(0)
    if kind == "eventgpt":
        return [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(5)]
    return rng.integers(0, 255, (8, 240, 320, 3), dtype=np.uint8)


def decode_ms_per_token(vlm, visual, new_tokens: int) -> float:
    """Median ms of a 1-token forward over ``new_tokens`` steps after a prefill."""
    state = vlm.prefill(visual, QUESTION)
    token = int(state.logits.argmax())
    times = []
    for _ in range(new_tokens):
        sync(vlm.device)
        t0 = time.perf_counter()
        logits = vlm.forward(state, [token])
        token = int(logits[-1].argmax())  # the host needs the token, as in real decoding
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def verify_ratio(vlm, visual, k: int, repeats: int = 20) -> float:
    """Cost of one k-token forward over one 1-token forward, on a cached prompt."""
    state = vlm.prefill(visual, QUESTION)
    base = state.length

    def step(n):
        vlm.truncate(state, base)
        return vlm.forward(state, list(range(10, 10 + n)))

    t1, _ = timed_median(lambda: step(1), repeats, vlm.device)
    tk, _ = timed_median(lambda: step(k), repeats, vlm.device)
    return tk / t1


# a 16-row verify (pending token + 15 nodes): 4 children of the root, 4 + 3 under the two best, 2 + 2 below
TREE_PARENTS = (-1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 4, 4, 5, 5)


def tree_verify_ratio(vlm, visual, parents=TREE_PARENTS, repeats: int = 20) -> float:
    """Cost of one draft-tree verify (pending + ``parents`` nodes, tree mask) over one 1-token forward."""
    from common.tree import tree_attention_mask, tree_positions

    state = vlm.prefill(visual, QUESTION)
    base = state.length
    ids = list(range(10, 11 + len(parents)))
    mask = tree_attention_mask(list(parents), base, 1, vlm.device)
    positions = tree_positions(list(parents), base, 1, vlm.device)

    def step(tree: bool):
        vlm.truncate(state, base)
        if not tree:
            return vlm.forward(state, ids[:1])
        return vlm.forward(state, ids, attn_mask=mask, position_ids=positions)

    t1, _ = timed_median(lambda: step(False), repeats, vlm.device)
    tk, _ = timed_median(lambda: step(True), repeats, vlm.device)
    return tk / t1


def eagle_tree_verify_ratio(vlm, visual, parents=TREE_PARENTS, repeats: int = 20) -> dict[str, Any]:
    """A whole tree verify step as the EAGLE drafter runs it, over one 1-token forward of the same route.

    Through ``EagleTarget`` (final-layer features recorded): ``common.tree.verify_tree`` builds the tree
    mask, runs the forward, accepts greedily and compacts the KV cache and the features. Returns the
    ratio, the two medians in ms and the target's forwards per route (``Decoding.routes``) over the run.
    """
    from common.drafters.eagle_head import EagleTarget
    from common.models.decoding import counting_routes
    from common.tree import DraftTree, verify_tree

    proxy = EagleTarget(vlm, -1)
    state = proxy.prefill(visual, QUESTION)
    base, logits = state.length, state.logits
    tree = DraftTree(tokens=list(range(11, 11 + len(parents))), parents=list(parents))

    def step(with_tree: bool):
        proxy.truncate(state, base)
        state.logits = logits
        if not with_tree:
            return proxy.forward(state, [10])
        return verify_tree(proxy, state, [10], tree, 0.0)

    with counting_routes(vlm) as routes:
        t1, _ = timed_median(lambda: step(False), repeats, vlm.device)
        tk, _ = timed_median(lambda: step(True), repeats, vlm.device)
    return {"eagle_tree_verify_over_decode": tk / t1, "eagle_tree_verify_ms": 1000 * tk,
            "eagle_forward_ms": 1000 * t1, "eagle_tree_routes": dict(sorted(routes.items()))}


def hf_generate(vlm, cache: str, new_tokens: int) -> dict[str, Any]:
    """HF ``generate`` on the target's own weights: ms per new token (prefill subtracted)."""
    pixels = vlm.preprocess(raw_inputs("videollava"))
    visual_tokens = vlm.encode_pixels(pixels).num_tokens
    ids = torch.tensor([vlm.prompt_ids(QUESTION, visual_tokens)], device=vlm.device)
    kwargs: dict[str, Any] = dict(input_ids=ids, pixel_values_videos=pixels, do_sample=False,
                                  attention_mask=torch.ones_like(ids))
    if cache == "static":
        kwargs["cache_implementation"] = "static"

    def run(n):
        return vlm.model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)

    try:
        t1, _ = timed_median(lambda: run(1), 2, vlm.device)
        tn, out = timed_median(lambda: run(new_tokens), 2, vlm.device)
    except Exception as exc:
        return {"model": f"videollava HF generate ({cache})", f"hf_{cache}": f"failed: {type(exc).__name__}: {exc}"[:160]}
    return {"model": f"videollava HF generate ({cache} cache)", "generate_total_ms": 1000 * tn,
            "decode_ms_per_token_hf": 1000 * (tn - t1) / (new_tokens - 1), "generated": int(out.shape[1] - ids.shape[1])}
