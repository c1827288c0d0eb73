"""Evaluate a trained hidden adapter: offline metrics on extracted states, and live speculative decoding.

    python -m feature_alignment.evaluate_hidden_adapter --adapter results/feature_alignment/L1_<timestamp> \\
        --hidden_dir data/feature_alignment/hidden/test --dataset_dir D --split test --max_samples 20 \\
        --gamma 5 --max_new_tokens 50 [--output_dir results/feature_alignment/L1_<timestamp>/eval]

Offline (``--hidden_dir``): cosine, acc@0.80-0.95 and token top-1/top-5 through the target's LM
head over every position of the folder. Live (``--dataset_dir``, skipped with
``--live_samples 0``): per sample, the target's own greedy output, then speculative decoding
with :class:`common.drafters.hidden_drafter.HiddenAdapterDrafter` verified by the target; reports
vLLM-style acceptance (rate, mean accepted length, per position), draft/verify seconds and
whether every output equals the target's own (it must: lossless). Writes results.json and
RESULTS.md into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.cli import add_common_args, resolve_device, resolve_quant, set_seed, shard
from common.data import ClipDataset
from common.defaults import resolve_dataset_dir, resolve_model_paths
from common.drafters.hidden_adapter import load_any_adapter, read_adapter_meta
from common.drafters.hidden_drafter import adapter_input_layers, load_hidden_adapter_drafter
from common.results import atomic_write_json, atomic_write_text, to_jsonable
from common.speculative import ModelDrafter, aggregate_metrics, autoregressive_generate, speculative_generate
from common.timing import sync
from feature_alignment.hidden_store import HiddenStore, load_lm_head
from feature_alignment.train_hidden_adapter import THRESHOLDS, evaluate

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feature_alignment.evaluate_hidden_adapter",
                                description="Offline and live evaluation of a hidden-state adapter.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--adapter", required=True, help="adapter checkpoint file, or a training folder (best.safetensors)")
    p.add_argument("--hidden_dir", default=None, help="extraction folder for offline metrics. Default: none.")
    p.add_argument("--live_samples", type=int, default=None,
                   help="samples decoded live (0 = no live run). Default: --max_samples, else 20.")
    p.add_argument("--gamma", type=int, default=5, help="draft tokens per verify step. Default: 5.")
    p.add_argument("--max_new_tokens", type=int, default=50, help="answer length cap. Default: 50.")
    p.add_argument("--no_model_drafter", dest="model_drafter", action="store_false", default=True,
                   help="skip the comparison with plain EventGPT drafting (ModelDrafter, its own LM head).")
    add_common_args(p, output=False)
    p.add_argument("--output_dir", default=None, help="where results go. Default: <adapter folder>/eval.")
    return p


def offline(adapter_path: str | Path, hidden_dir: str | Path, device: torch.device) -> dict[str, Any]:
    """Teacher-forced metrics of the adapter over every position of ``hidden_dir``."""
    adapter = load_any_adapter(adapter_path, device)
    meta = adapter.meta
    store = HiddenStore.open(hidden_dir)
    head_path = store.lm_head_path()
    lm_head, head_meta = load_lm_head(head_path) if head_path else (None, {})
    if lm_head is not None:
        lm_head = lm_head.to(device, torch.float32)
    return evaluate(adapter, store, None, batch_size=64, input_layer=int(meta.get("input_layer", -1)),
                    target_layer=int(meta.get("target_layer", -1)), lm_head=lm_head,
                    vocab_limit=head_meta.get("shared_vocab_size"), device=device)


@torch.no_grad()
def live(adapter_path: str | Path, draft: Any, target: Any, samples: Sequence[Any], gamma: int,
         max_new_tokens: int, model_drafter: bool = True) -> dict[str, Any]:
    """Speculative decoding with the adapter drafter against the target's own greedy output.

    With ``model_drafter`` the same samples are also decoded with plain EventGPT drafting
    (``ModelDrafter``: EventGPT's own LM head, shared base vocabulary) for comparison.
    """
    adapter = load_any_adapter(adapter_path, target.device)
    layers = adapter_input_layers(adapter)
    device_sync = (lambda: sync(target.device)) if target.device.type == "cuda" else None
    results, records, plain = [], [], []
    limit = min(int(draft.base_vocab_size), int(target.base_vocab_size))
    for sample in tqdm(samples, desc="live", unit="sample", disable=None):
        d_vis, t_vis = draft.encode(sample), target.encode(sample)
        base = autoregressive_generate(target, target.prefill(t_vis, sample.question), max_new_tokens=max_new_tokens,
                                       sync=device_sync)
        draft_state = draft.prefill(d_vis, sample.question, hidden_layers=layers)
        drafter = load_hidden_adapter_drafter(adapter, draft, draft_state, target, sync=device_sync)
        spec = speculative_generate(target, target.prefill(t_vis, sample.question), drafter,
                                    max_new_tokens=max_new_tokens, gamma=gamma, sync=device_sync)
        results.append(spec)
        if model_drafter:
            md = ModelDrafter(draft, draft.prefill(d_vis, sample.question), vocab_limit=limit,
                              target_vocab_size=target.vocab_size, stop_token_ids=[target.eos_token_id],
                              sync=device_sync)
            plain_result = speculative_generate(target, target.prefill(t_vis, sample.question), md,
                                                max_new_tokens=max_new_tokens, gamma=gamma, sync=device_sync)
            plain.append(plain_result)
            if plain_result.tokens != base.tokens:
                raise AssertionError(f"{sample.id}: ModelDrafter output differs from the target's own")
        records.append({"id": sample.id, "identical": spec.tokens == base.tokens, "num_tokens": len(spec.tokens),
                        "acceptance_rate": spec.acceptance_rate, "mean_accepted_length": spec.mean_accepted_length,
                        "baseline_seconds": base.seconds, "speculative_seconds": spec.total_seconds,
                        "draft_seconds": spec.draft_seconds, "verify_seconds": spec.verify_seconds})
    stats = aggregate_metrics(results)
    stats["identical_outputs"] = sum(r["identical"] for r in records)
    stats["lossless"] = all(r["identical"] for r in records)
    stats["baseline_seconds"] = sum(r["baseline_seconds"] for r in records)
    if plain:
        stats["model_drafter"] = aggregate_metrics(plain)
    return {"statistics": stats, "samples": records}


def markdown(adapter_path: str, config: dict[str, Any], off: dict[str, Any] | None, on: dict[str, Any] | None,
             gamma: int) -> str:
    lines = [f"# Hidden adapter L{config['level']} evaluation", "", f"Checkpoint: `{adapter_path}`", ""]
    if off:
        lines += ["## Offline (teacher-forced, every position)", "",
                  "| positions | cosine | " + " | ".join(f"acc@{t:.2f}" for t in THRESHOLDS) + " | top-1 | top-5 |",
                  "|---" * (4 + len(THRESHOLDS)) + "|",
                  f"| {off.get('positions')} | {off.get('cos', 0):.4f} | "
                  + " | ".join(f"{100 * (off.get(f'acc@{t:.2f}') or 0):.1f}%" for t in THRESHOLDS)
                  + f" | {100 * (off.get('top1') or 0):.1f}% | {100 * (off.get('top5') or 0):.1f}% |", ""]
    if on:
        s = on["statistics"]
        rate = s.get("acceptance_rate")
        lines += ["## Live speculative decoding (verified by the target)", "",
                  f"- samples: {s['num_samples']}, gamma {gamma}; outputs identical to the target's own: "
                  f"{s['identical_outputs']}/{s['num_samples']} ({'lossless' if s['lossless'] else 'NOT LOSSLESS'})",
                  f"- draft acceptance rate: {'-' if rate is None else f'{100 * rate:.1f}%'}; mean accepted length "
                  f"{s.get('mean_accepted_length') or 0:.2f}",
                  "- per-position acceptance: " + ", ".join(f"{100 * a:.0f}%" for a in s["per_position_acceptance"]),
                  f"- seconds: speculative {s['total_seconds']:.2f} (draft {s['draft_seconds']:.2f}, verify "
                  f"{s['verify_seconds']:.2f}) vs target alone {s['baseline_seconds']:.2f}"]
        plain = s.get("model_drafter")
        if plain:
            prate = plain.get("acceptance_rate")
            lines.append(f"- for comparison, plain EventGPT drafting (its own LM head): acceptance "
                         f"{'-' if prate is None else f'{100 * prate:.1f}%'}, mean accepted length "
                         f"{plain.get('mean_accepted_length') or 0:.2f}, per position "
                         + ", ".join(f"{100 * a:.0f}%" for a in plain["per_position_acceptance"]))
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, models: tuple[Any, Any] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_seed(args.seed)
    device = resolve_device(args.device)
    config, _ = read_adapter_meta(args.adapter)
    adapter_path = Path(args.adapter)
    out = Path(args.output_dir) if args.output_dir else (adapter_path if adapter_path.is_dir() else adapter_path.parent) / "eval"
    off = offline(args.adapter, args.hidden_dir, device) if args.hidden_dir else None
    n_live = args.live_samples if args.live_samples is not None else (args.max_samples or 20)
    on = None
    if n_live > 0:
        dataset = ClipDataset(resolve_dataset_dir(args.dataset_dir), split=args.split, max_questions=args.max_questions,
                              allow_pickle=args.allow_pickle, event_source=args.event_source)
        samples = shard([dataset[i] for i in range(min(n_live, len(dataset)))], args.num_chunks, args.chunk_idx)
        if models is None:
            from common.models.loader import load_vlm

            egpt_path, vl_path = resolve_model_paths(args.eventgpt_path, args.videollava_path)
            quant = resolve_quant(args)
            models = (load_vlm("eventgpt", egpt_path, quant=quant, device=device, allow_pickle=args.allow_pickle),
                      load_vlm("videollava", vl_path, quant=quant, device=device))
        on = live(args.adapter, models[0], models[1], samples, args.gamma, args.max_new_tokens, args.model_drafter)
    result = {"adapter": str(args.adapter), "adapter_config": config, "offline": off,
              "live": on["statistics"] if on else None, "gamma": args.gamma}
    atomic_write_json(out / "results.json", {**result, "samples": on["samples"] if on else []})
    atomic_write_text(out / "RESULTS.md", markdown(str(args.adapter), config, off, on, args.gamma))
    return result


def _cli(argv: Sequence[str]) -> None:
    res = main(argv)
    print(json.dumps(to_jsonable({"offline": res["offline"], "live": res["live"] and {
        k: res["live"][k] for k in ("acceptance_rate", "mean_accepted_length", "identical_outputs", "num_samples")}}),
        indent=2))


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(_cli)
