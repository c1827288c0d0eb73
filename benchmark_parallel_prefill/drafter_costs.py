"""Per-token draft cost of every drafter vs the target's decode step (c), at the real 7B shapes.

    python -m benchmark_parallel_prefill.drafter_costs [--quant bf16 --models_dir /tmp/real_shape_models
        --gamma 5 --steps 30 --pool 2 --context 50 --output_dir results/drafter_costs]
    python -m benchmark_parallel_prefill.drafter_costs --tiny          # CPU smoke test on the default pair

Builds EventGPT and Video-LLaVA at the real shapes with random weights (timings are the real
pair's; outputs are noise), loads them through ``load_vlm`` (``--quant``), turns on CUDA-graph
decoding on CUDA, and measures, as medians of synchronised single steps on a cached prompt:

- the target's decode step (1 token) and verify step (gamma + 1 tokens);
- EventGPT's decode step (raw drafting: one step per draft token);
- the pooled self-draft's decode step (the target with ``pool x pool``-pooled video tokens) and its prefill;
- the EAGLE head's step (one head position + the target's LM head + argmax), random weights at the
  target's shape (or ``--eagle_head``), and its commit step (gamma + 1 positions); and the drafter's
  static chain (commit + gamma-token chain, CUDA graphs when the target decodes with them) per proposal;
  and an EAGLE-2 draft tree (``--tree_topk/--tree_tokens``, default 4/16) on that chain, per tree;
- L1 adapter + LM head per token (plus the EventGPT forward with hidden states that the L1-L4
  drafters pay per token), and the L5 adapter's feature-space step at ``--context`` rows.

Prints c = draft ms per drafted token / target decode ms for each, and writes results.json +
RESULTS.md to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.compression import PooledVideoLlava
from common.drafters.eagle_head import CHAIN_CAPACITY, eager_tree
from common.models.loader import load_vlm
from common.pipeline import configure_decode
from common.results import atomic_write_json, atomic_write_text, markdown_table
from common.timing import sync
from common.tree import TreeConfig, add_tree_args, tree_config_from

QUESTION = "What are the key elements in this scene?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark_parallel_prefill.drafter_costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", default=None, choices=["bf16", "fp16", "4bit", "8bit", "fp32"],
                   help="precision (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="the embedded default (tiny) pair instead of 7B shapes")
    p.add_argument("--eventgpt_path", default=None, help="EventGPT checkpoint instead of building one")
    p.add_argument("--videollava_path", default=None, help="Video-LLaVA checkpoint instead of building one")
    p.add_argument("--models_dir", default="/tmp/real_shape_models", help="where the random 7B checkpoints are written")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--decode_mode", choices=["auto", "eager", "cuda_graph", "compiled_graph"], default="auto",
                   help="target/draft decoding (auto: CUDA graphs on CUDA, eager on CPU)")
    p.add_argument("--gamma", type=int, default=5, help="draft length: verify step = gamma + 1 tokens (default 5)")
    p.add_argument("--steps", type=int, default=30, help="timed repetitions per measurement (median; default 30)")
    p.add_argument("--pool", type=int, default=2, help="pooling of the self-draft (default 2)")
    p.add_argument("--context", type=int, default=50, help="answer tokens already decoded when timing (default 50)")
    p.add_argument("--eagle_head", default=None, help="a trained EAGLE head (default: random at the target's shape)")
    p.add_argument("--output_dir", default="results/drafter_costs", help="folder for results.json and RESULTS.md")
    add_tree_args(p)  # the EAGLE draft tree priced per tree (default --tree_topk 4 --tree_tokens 16)
    return p


def _median_ms(fn, steps: int, device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _inputs(kind: str) -> Any:
    rng = np.random.default_rng(0)
    if kind == "eventgpt":
        return [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(5)]
    return rng.integers(0, 255, (8, 240, 320, 3), dtype=np.uint8)


def _visual(vlm, kind: str):
    return vlm.encode_pixels(vlm.preprocess(_inputs(kind)))


def _tokens(vlm, n: int) -> list[int]:
    return _ids(int(vlm.base_vocab_size), n)


def _ids(limit: int, n: int) -> list[int]:
    """``n`` fixed token ids in [3, limit)."""
    return [(7 * i + 11) % max(limit - 3, 1) + 3 for i in range(n)]


def step_ms(vlm, visual, context: int, k: int, steps: int, hidden_layers=()) -> tuple[float, float, int]:
    """(median ms of a k-token forward at ``context`` answer tokens, prefill ms, prompt tokens)."""
    state = vlm.prefill(visual, QUESTION)
    vlm.forward(state, _tokens(vlm, context))
    base = state.length
    feed = _tokens(vlm, k)

    def one():
        vlm.truncate(state, base)
        logits = vlm.forward(state, feed, hidden_layers)
        return int(logits[-1].argmax())  # the host needs the token, as in real drafting

    ms = _median_ms(one, steps, vlm.device)
    pre = _median_ms(lambda: vlm.prefill(visual, QUESTION), max(3, steps // 10), vlm.device)
    return ms, pre, state.prompt_length


def eagle_costs(target, head, context: int, gamma: int, steps: int) -> dict[str, float]:
    """Head step (1 position + LM head + argmax) and commit step (gamma + 1 positions), ms."""
    dev = target.device
    h = torch.randn(context + gamma + 1, target.hidden_size, device=dev, dtype=target.dtype)
    ids = _tokens(target, context + gamma + 1)
    cache = head.new_cache(context + 2 * gamma + 8)
    with torch.no_grad():
        head.step(h[:context], ids[:context], cache)

    def one():
        cache.truncate(context)
        out = head.step(h[context:context + 1], ids[context:context + 1], cache)
        return int(head.logits(out[-1]).argmax())

    def commit():
        cache.truncate(context)
        out = head.step(h[context:context + gamma + 1], ids[context:context + gamma + 1], cache)
        return int(head.logits(out[-1]).argmax())

    with torch.no_grad():
        return {"step_ms": _median_ms(one, steps, dev), "commit_ms": _median_ms(commit, steps, dev)}


def chain_costs(chain, feats: torch.Tensor, ids: list[int], context: int, gamma: int, steps: int
                ) -> dict[str, float]:
    """A drafter's static chain (``common.drafters.draft_graphs.HeadChain``), ms per call, host reads included:
    ``commit_ms`` (gamma + 1 padded rows), ``chain_ms`` (gamma tokens, one replay, one host read) and
    ``proposal_ms`` (both, as a proposal runs them) after ``context`` committed rows; with CUDA graphs also
    ``*_replay_ms`` (GPU time alone). ``feats``/``ids``: context + gamma + 1 rows."""
    dev = feats.device
    chain.claim(object())  # the benchmark's own context in the shared cache
    with torch.no_grad():
        root = chain.commit(feats[:context], ids[:context])[-1]

        def commit():
            chain.cache.truncate(context)
            return chain.commit(feats[context:], ids[context:])

        def proposal():
            return chain.chain(commit()[-1], gamma)

        out = {"commit_ms": _median_ms(commit, steps, dev),
               "chain_ms": _median_ms(lambda: chain.chain(root, gamma), steps, dev),
               "proposal_ms": _median_ms(proposal, steps, dev)}
        if chain.graphs:
            out.update({f"{k[:-3]}_replay_ms": v for k, v in chain.replay_ms(gamma).items()})
    chain.claim(object())
    return out


def eagle_chain_costs(target, head, context: int, gamma: int, steps: int, graphs: bool,
                      capacity: int = CHAIN_CAPACITY) -> dict[str, float]:
    """:func:`chain_costs` of the EAGLE drafter's chain (CUDA graphs when ``graphs``)."""
    feats = torch.randn(context + gamma + 1, target.hidden_size, device=target.device, dtype=target.dtype)
    chain = head.draft_chain(capacity, gamma + 1, graphs=graphs)
    return chain_costs(chain, feats, _tokens(target, context + gamma + 1), context, gamma, steps)


def eagle_tree_costs(head, context: int, config: TreeConfig, steps: int, graphs: bool,
                     capacity: int = CHAIN_CAPACITY) -> dict[str, float]:
    """An EAGLE-2 draft tree of ``config`` (``--tree_topk/--tree_tokens/--tree_depth``) from a random root after
    ``context`` committed rows, ms per tree with its host reads: ``ms`` on the drafter's static chain
    (``HeadChain.tree``, CUDA graphs when ``graphs``; its ``depth``, ``nodes`` and ``expansions`` beside it),
    ``root_ms`` (the root's top-k alone), ``expansion_ms`` (per further depth), ``eager_ms`` (the eager
    reference, one head step per depth); with graphs the GPU time of one ``root_replay_ms``/``expand_replay_ms``.
    ``head`` is bound (its device and dtype are used). A random head's tree is shallower than a trained one's:
    ``expansion_ms`` prices deeper trees."""
    p = head.fc.weight
    dev = p.device
    feats = torch.randn(context + 1, head.feature_size, device=dev, dtype=p.dtype)
    ids, root = _ids(head.vocab_limit or 1000, context), feats[context]
    chain = head.draft_chain(capacity, 8, graphs=graphs)
    chain.claim(object())  # the benchmark's own context in the shared cache
    cache = head.new_cache(context + config.topk * config.tokens + 8)
    with torch.no_grad():
        chain.commit(feats[:context], ids)
        head.step(feats[:context], ids, cache)
        tree, expansions = chain.tree(root, config, config.max_depth)
        out = {"ms": _median_ms(lambda: chain.tree(root, config, config.max_depth), steps, dev),
               "depth": tree.depth, "nodes": len(tree), "expansions": expansions,
               "root_ms": _median_ms(lambda: chain.tree(root, TreeConfig(topk=config.topk, tokens=2), 1), steps, dev)}
        out["expansion_ms"] = (out["ms"] - out["root_ms"]) / max(expansions, 1)

        def eager():
            cache.truncate(context)
            return eager_tree(head, cache, root, config, config.max_depth)

        out["eager_ms"] = _median_ms(eager, steps, dev)
        if graphs:
            out.update({f"{k[:-3]}_replay_ms": v for k, v in chain.tree_replay_ms(config).items()})
    chain.claim(object())
    return out


def l5_chain_costs(draft, target, context: int, gamma: int, steps: int, graphs: bool,
                   capacity: int = CHAIN_CAPACITY) -> dict[str, float]:
    """:func:`chain_costs` of the L5 drafter's feature-space chain (a random L5 adapter, float32, as loaded)."""
    from common.drafters.hidden_adapter import create_adapter

    dev = target.device
    limit = min(int(draft.base_vocab_size), int(target.base_vocab_size))
    l5 = create_adapter(5, draft.hidden_size, target.hidden_size, vocab_size=int(target.vocab_size)).to(dev).eval()
    feats = torch.randn(context + gamma + 1, target.hidden_size, device=dev)
    chain = l5.draft_chain(target.lm_head, limit, capacity, gamma + 1, graphs=graphs)
    return chain_costs(chain, feats, _tokens(target, context + gamma + 1), context, gamma, steps)


def adapter_costs(draft, target, context: int, gamma: int, steps: int) -> dict[str, float]:
    """L1 (adapter + LM head + argmax per token) and L5 (feature-space chain step at ``context`` rows), ms."""
    from feature_alignment.hidden_adapter import create_adapter, masked_logits

    dev = target.device
    limit = min(int(draft.base_vocab_size), int(target.base_vocab_size))
    out: dict[str, float] = {}
    l1 = create_adapter(1, draft.hidden_size, target.hidden_size).to(dev).eval()
    x = torch.randn(1, draft.hidden_size, device=dev)
    with torch.no_grad():
        out["L1_ms"] = _median_ms(lambda: int(masked_logits(l1(x)[0][0], target.lm_head, limit).argmax()), steps, dev)
        l5 = create_adapter(5, draft.hidden_size, target.hidden_size, vocab_size=int(target.vocab_size)).to(dev).eval()
        states = torch.randn(context + 1, draft.hidden_size, device=dev)
        ids = torch.tensor(_tokens(target, context + 1), device=dev)
        feats = l5.align(states)

        def l5_step():  # one further token of EagleAdapter.speculative_decode: the trunk over the whole history
            nxt = l5.next_features(feats.unsqueeze(0), ids.unsqueeze(0))[0, -1]
            return int(masked_logits(nxt, target.lm_head, limit).argmax())

        out["L5_step_ms"] = _median_ms(l5_step, steps, dev)
    return out


def build_models(args) -> tuple[Any, Any, str]:
    quant = args.quant
    device = args.device
    if args.tiny or (args.eventgpt_path and args.videollava_path):
        from common.defaults import resolve_model_paths

        e_path, v_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
        label = "tiny default pair" if args.tiny else f"{e_path} + {v_path}"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the 7B shapes need a CUDA device; use --tiny for a CPU smoke test")
        from common.models.real_shape import write_real_shape_pair

        t0 = time.perf_counter()
        paths = write_real_shape_pair(args.models_dir)
        print(f"7B-shape checkpoints ready in {time.perf_counter() - t0:.0f} s", flush=True)
        e_path, v_path = paths["eventgpt"], paths["videollava"]
        label = "random weights at the real 7B shapes"
    draft = load_vlm("eventgpt", e_path, quant=quant, device=device)
    target = load_vlm("videollava", v_path, quant=quant, device=device)
    return draft, target, label


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    draft, target, label = build_models(args)
    pooled = PooledVideoLlava(target, args.pool)
    mode = configure_decode((draft, target, pooled), args.decode_mode, max_length=4096, gamma=args.gamma,
                            vision_graphs=False)
    g, ctx, steps = args.gamma, args.context, args.steps
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    with torch.no_grad():
        t_vis, e_vis = _visual(target, "videollava"), _visual(draft, "eventgpt")
        t_ms, t_pre, t_prompt = step_ms(target, t_vis, ctx, 1, steps)
        t_ver, _, _ = step_ms(target, t_vis, ctx, g + 1, steps)
        e_ms, e_pre, e_prompt = step_ms(draft, e_vis, ctx, 1, steps)
        e_hid_ms, _, _ = step_ms(draft, e_vis, ctx, 1, steps, hidden_layers=[-1])
        p_ms, p_pre, p_prompt = step_ms(pooled, pooled.pool_visual(t_vis), ctx, 1, steps)
        if args.eagle_head:
            from feature_alignment.eagle_head import load_eagle_head

            head = load_eagle_head(args.eagle_head, target)
        else:
            from feature_alignment.eagle_head import EagleHead, EagleHeadConfig

            head = EagleHead(EagleHeadConfig.for_target(target)).to(target.device, target.dtype).eval().bind(target)
        eagle = eagle_costs(target, head, ctx, g, steps)
        chain_graphs = target.graphs is not None  # the drafter's own choice (chain="auto")
        chain = eagle_chain_costs(target, head, ctx, g, steps, graphs=chain_graphs)
        tree_config = tree_config_from(args.tree_topk, args.tree_tokens, args.tree_depth) or TreeConfig(topk=4, tokens=16)
        tree = eagle_tree_costs(head, ctx, tree_config, steps, graphs=chain_graphs)
        l5_chain = l5_chain_costs(draft, target, ctx, g, steps, graphs=chain_graphs)
        adapters = adapter_costs(draft, target, ctx, g, steps)
    info.update(target_decode_ms=t_ms, target_verify_ms=t_ver, target_prefill_ms=t_pre, target_prompt_tokens=t_prompt,
                eventgpt_prefill_ms=e_pre, eventgpt_prompt_tokens=e_prompt, pooled_prefill_ms=p_pre,
                pooled_prompt_tokens=p_prompt, eagle_head_parameters=head.num_parameters(),
                **{f"eagle_tree_{k}": v for k, v in tree.items()})

    def row(name: str, ms: float, note: str) -> None:
        rows.append({"drafter": name, "ms per draft token": ms, "c": ms / t_ms, "note": note})

    row("target verify (gamma+1 tokens)", t_ver, f"one verify forward of {g + 1} tokens (not a drafter: "
                                                 f"{t_ver / t_ms:.2f}x a decode step)")
    row("eventgpt", e_ms, "one EventGPT decode step per draft token")
    row(f"pooled_x{args.pool}", p_ms, f"self-draft decode step; prompt {p_prompt} vs {t_prompt} tokens, prefill "
                                      f"{p_pre:.1f} vs {t_pre:.1f} ms")
    row("eagle", eagle["step_ms"], f"head step + LM head + argmax; commit of {g + 1} rows {eagle['commit_ms']:.2f} ms "
                                   "once per proposal")
    row("eagle (per token, incl. commit)", eagle["step_ms"] + eagle["commit_ms"] / g,
        "commit amortised over gamma tokens")
    row(f"eagle chain ({'CUDA graphs' if chain_graphs else 'static, eager'}, per token, incl. commit)",
        chain["proposal_ms"] / g, f"one proposal: commit of {g + 1} rows ({chain['commit_ms']:.2f} ms) + "
                                  f"{g}-token chain ({chain['chain_ms']:.2f} ms), one host read")
    row(f"eagle tree, topk {tree_config.topk}, {tree_config.tokens} rows ({'CUDA graphs' if chain_graphs else 'static, eager'}"
        ", per TREE)", tree["ms"], f"one tree of depth {tree['depth']} ({tree['expansions']} expansions, "
                                   f"{tree['expansion_ms']:.2f} ms each); eager reference {tree['eager_ms']:.2f} ms")
    row("L1 adapter + LM head", adapters["L1_ms"], "adapter and LM head only")
    row("L1-L4 drafter", e_hid_ms + adapters["L1_ms"], "EventGPT forward with hidden states (eager: hidden states "
                                                       "bypass CUDA graphs) + L1 adapter + LM head, per token")
    row("L5 step", adapters["L5_step_ms"], f"feature-space chain step over {ctx + 1} rows (no cache) + LM head")
    row("L5 drafter (per token)", adapters["L5_step_ms"] + e_hid_ms / g,
        "L5 step + one EventGPT forward per proposal amortised over gamma")
    row(f"L5 drafter on its chain ({'CUDA graphs' if chain_graphs else 'static, eager'}, per token)",
        (l5_chain["proposal_ms"] + e_hid_ms) / g, f"commit of {g + 1} trunk rows + {g}-token chain over a KV cache "
                                                  "+ one EventGPT forward per proposal, amortised over gamma")
    device_name = torch.cuda.get_device_name() if target.device.type == "cuda" else "cpu"
    out = {"device": device_name, "models": label, "quant": args.quant, "decode_mode": mode, "date": dt.date.today()
           .isoformat(), "torch": torch.__version__, "argv": argv, "gamma": g, "context": ctx, **info, "rows": rows}
    table = markdown_table(rows, floatfmt=".3f")
    folder = Path(args.output_dir)
    atomic_write_json(folder / "results.json", out)
    atomic_write_text(folder / "RESULTS.md",
                      f"# Drafter costs ({device_name}, {label}, {args.quant or 'default precision'}, {mode})\n\n"
                      f"`python -m benchmark_parallel_prefill.drafter_costs {' '.join(argv)}`\n\n"
                      f"Target decode step {t_ms:.3f} ms, verify of {g + 1} tokens {t_ver:.3f} ms, prefill "
                      f"{t_pre:.1f} ms ({t_prompt} tokens). c = draft ms per drafted token / target decode ms.\n\n"
                      f"{table}\n")
    print(f"target decode {t_ms:.3f} ms/step ({mode}, {device_name})")
    print(table)
    return out


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
