"""The benchmarks' shared flag groups, free of torch and numpy so ``--help`` prints at once.

``add_drafter_args``/``add_token_adapter_flag`` (also importable from :mod:`common.drafters.factory`),
``add_decode_args`` (also from :mod:`common.pipeline`) and ``add_tree_args`` (also from :mod:`common.tree`).
"""

from __future__ import annotations

import argparse
from typing import Any

from common.cli import DeprecatedFlag, non_negative_int, positive_int

DRAFTER_CHOICES = ("eventgpt", "token_adapter", "hidden_adapter", "eagle")


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    """``--drafter KIND`` plus one flag per checkpoint: ``--token_adapter``, ``--hidden_adapter``, ``--eagle_head``.

    The old spellings ``--use_token_adapter`` and ``--token_adapter_path`` still work (one deprecation line).
    """
    g = parser.add_argument_group("drafter")
    g.add_argument("--drafter", choices=DRAFTER_CHOICES, default=None,
                   help="what proposes tokens: raw EventGPT greedy tokens (default), the TokenAdapter, "
                        "a hidden-state adapter through the target's LM head, or the EAGLE head")
    add_token_adapter_flag(g, "TokenAdapter checkpoint or run folder; with --drafter token_adapter (default: the "
                              "latest for this model pair under token_alignment/task, recorded in config.json)")
    g.add_argument("--use_token_adapter", dest="drafter", action=DeprecatedFlag, nargs=0, const="token_adapter",
                   use="--drafter token_adapter", help=argparse.SUPPRESS)
    g.add_argument("--hidden_adapter", metavar="PATH", default=None,
                   help="hidden-state adapter checkpoint (L1-L5); implies --drafter hidden_adapter")
    g.add_argument("--eagle_head", metavar="PATH", default=None,
                   help="EAGLE-style head over Video-LLaVA's own features (python -m feature_alignment."
                        "train_eagle_head); implies --drafter eagle")


def add_token_adapter_flag(group: Any, help: str) -> None:
    """``--token_adapter PATH`` (stored as ``token_adapter_path``) and its deprecated spelling ``--token_adapter_path``."""
    group.add_argument("--token_adapter", dest="token_adapter_path", metavar="PATH", default=None, help=help)
    group.add_argument("--token_adapter_path", dest="token_adapter_path", action=DeprecatedFlag,
                       use="--token_adapter PATH", help=argparse.SUPPRESS)


def concurrency_spec(value: str) -> str:
    """``--concurrency``'s type: the value itself once ``common.concurrency.named_options`` accepts it."""
    from common.concurrency import named_options

    try:
        named_options(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--concurrency {value!r}: ")) from None
    return value


def add_decode_args(group, free_tokens: bool = False) -> None:
    """``--max_new_tokens --gamma --decode_mode --lossless_reference`` (and ``--max_free_tokens`` for
    benchmarks that draft during the target's prefill), shared by the benchmarks."""
    group.add_argument("--max_new_tokens", type=positive_int, default=50,
                       help="tokens generated per answer (default 50)")
    group.add_argument("--gamma", type=positive_int, default=5, help="draft tokens per speculative step (default 5)")
    if free_tokens:
        group.add_argument("--max_free_tokens", type=non_negative_int, default=64,
                           help="cap on tokens drafted during the target's prefill (default 64)")
        group.add_argument("--concurrency", type=concurrency_spec, default=None, metavar="NAME[,KEY=VALUE...]",
                           help="how the draft runs beside the target's prefill on one GPU: threads (two threads, "
                                "two streams; the default) or draft_graphs (+ the draft's stream at high priority "
                                "and its LLM prefill as a CUDA graph), optionally with overrides, e.g. "
                                "draft_graphs,head_start_ms=20,target_sms=112 (keys: priority, graph_prefill, "
                                "draft_sms, target_sms, head_start_ms, switch_ms); see "
                                "benchmark_inference.concurrency_probe")
    group.add_argument("--decode_mode", choices=["auto", "eager", "cuda_graph", "compiled_graph"], default="auto",
                       help="auto: CUDA graphs on CUDA, eager on CPU; compiled_graph adds torch.compile "
                            "(slower start) (default auto)")
    group.add_argument("--eager_vision", action="store_true",
                       help="with CUDA graphs, keep the vision towers eager (default: replay them as CUDA graphs, "
                            "which keeps two concurrently driven models from holding up each other's launches)")
    group.add_argument("--lossless_reference", choices=["fixed_step", "fastest"], default="fixed_step",
                       help="with CUDA graphs, run the target's reference decode and its speculative verification "
                            "through the same padded (gamma+1)-token step so they agree bitwise in bf16/4-bit "
                            "(fixed_step, default), or compare against the fastest 1-token decode (fastest). "
                            "The baseline is always timed with the fastest decode.")


def add_tree_args(parser: argparse.ArgumentParser) -> None:
    """``--tree_topk K --tree_tokens N`` (both needed; default off: chain drafting), optional ``--tree_depth D``."""
    g = parser.add_argument_group("draft trees (EAGLE-2 style)")
    g.add_argument("--tree_topk", type=int, default=None,
                   help="draft a tree: expand the K most likely nodes into K children per depth (needs --tree_tokens)")
    g.add_argument("--tree_tokens", type=int, default=None,
                   help="tree rows verified in one target forward, the pending token included "
                        "(equal verify cost to a chain of gamma: gamma + 1)")
    g.add_argument("--tree_depth", type=int, default=None,
                   help="deepest tree level drafted (default: as deep as --tree_tokens allows); each level costs "
                        "one draft-head step, so a cap trades a little accepted length for a cheaper draft")

