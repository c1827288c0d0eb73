"""compare_drafters on the default tiny pair: every drafter lossless on the same samples, one run folder,
resumable per (drafter, sample); the pooled self-draft's shorter prompt; the hybrid's switch."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark_parallel_prefill import compare_drafters as cd
from common.compression import PooledVideoLlava, pool_video_tokens, pooled_drafter
from common.data import ClipDataset
from common.defaults import default_dataset_dir
from common.drafters.eagle_head import EagleHead, EagleHeadConfig, save_eagle_head
from common.drafters.hidden_adapter import create_adapter, save_adapter
from common.pipeline import prefill_sample
from common.results import read_json
from common.speculative import autoregressive_generate, speculative_generate

NEW = 8




@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    """Random-weight TokenAdapter, L1, L5 and EAGLE head checkpoints for the default pair."""
    from common.drafters.token_adapter import TokenAdapter, TokenAdapterConfig

    draft, target = models
    out = tmp_path_factory.mktemp("drafter_ckpts")
    torch.manual_seed(0)
    limit = min(draft.base_vocab_size, target.base_vocab_size)
    TokenAdapter(TokenAdapterConfig(draft_vocab_size=draft.vocab_size, target_vocab_size=target.vocab_size,
                                    vocab_limit=limit, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                                    max_draft_len=16, max_positions=32, draft_answer_tokens=NEW)
                 ).save_pretrained(out / "token_adapter")
    save_adapter(create_adapter(1, draft.hidden_size, target.hidden_size), out / "L1.safetensors", {"input_layer": -1})
    save_adapter(create_adapter(5, draft.hidden_size, target.hidden_size, vocab_size=target.vocab_size),
                 out / "L5.safetensors", {"input_layer": -1})
    save_eagle_head(EagleHead(EagleHeadConfig.for_target(target)), out / "eagle")
    return out


def test_every_drafter_is_lossless_in_one_resumable_run(checkpoints, tmp_path):
    argv = ["--dataset_dir", str(default_dataset_dir()), "--max_samples", "2", "--max_new_tokens", str(NEW),
            "--gamma", "3", "--max_free_tokens", "4", "--warmup_steps", "0", "--device", "cpu",
            "--token_adapter_path", str(checkpoints / "token_adapter"),
            "--hidden_adapter", f"L1={checkpoints / 'L1.safetensors'},L5={checkpoints / 'L5.safetensors'}",
            "--eagle_head", str(checkpoints / "eagle"), "--pool", "2", "--output_dir", str(tmp_path),
            "--task_name", "cmp"]
    out = cd.main(argv)
    stats = out["statistics"]
    expected = {"eventgpt", "token_adapter", "L1", "L5", "eagle", "pooled_x2", "hybrid", "hybrid_L5"}
    assert set(stats["drafters"]) == expected
    assert stats["num_samples"] == 2
    for name, s in stats["drafters"].items():
        assert s["samples"] == 2, name
        assert s["lossless_rate"] == 1.0, name
        for key in ("acceptance_rate", "mean_accepted_length", "cost_ratio_c", "speedup_measured",
                    "decode_speedup_measured", "speedup_predicted"):
            assert key in s, (name, key)
    # the pooled self-draft prefills a shorter prompt than the target
    assert stats["drafters"]["pooled_x2"]["draft_prompt_tokens_avg"] < stats["target"]["prompt_tokens_avg"]
    run = tmp_path / out["run_dir"].split("/")[-1]
    for name in ("config.json", "results.json", "RESULTS.md", "speedup.png", "acceptance.png", "DONE"):
        assert (run / name).is_file(), name
    records = read_json(run / "results.json")["samples"]
    hybrid = [r for r in records if r["drafter"] == "hybrid"]
    assert all(r["second_phase_tokens"] > 0 for r in hybrid)  # the EAGLE head took over
    assert "| eagle |" in (run / "RESULTS.md").read_text()

    # resume: drop the DONE marker and the last two records; only those are recomputed
    (run / "DONE").unlink()
    lines = (run / "records.jsonl").read_text().splitlines()
    dropped = [json.loads(line)["drafter"] for line in lines[-2:]]
    (run / "records.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    again = cd.main(argv)
    assert again["run_dir"] == out["run_dir"]
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines)
    assert [r["drafter"] for r in rows[-2:]] == dropped
    assert all(s["lossless_rate"] == 1.0 for s in again["statistics"]["drafters"].values())


def test_pooling_keeps_cls_and_averages_patch_windows():
    frames, grid, hidden = 8, 16, 4
    embeds = torch.randn(frames * (1 + grid * grid), hidden)
    pooled = pool_video_tokens(embeds, 2)
    assert pooled.shape == (frames * (1 + 64), hidden)  # Video-LLaVA: 2056 -> 520 tokens
    first = embeds[: 1 + grid * grid]
    assert torch.equal(pooled[0], first[0])  # CLS kept
    patches = first[1:].reshape(grid, grid, hidden)
    assert torch.allclose(pooled[1], patches[:2, :2].mean(dim=(0, 1)), atol=1e-6)
    assert torch.equal(pool_video_tokens(embeds, 1), embeds)


def test_pooled_self_draft_has_fewer_prompt_tokens_and_is_lossless(models):
    _, target = models
    pooled = PooledVideoLlava(target, pool=2)
    sample = list(ClipDataset(default_dataset_dir()))[0]
    tgt = prefill_sample(target, sample)
    reference = autoregressive_generate(target, tgt.state, max_new_tokens=10).tokens
    visual = target.encode(sample)
    state = pooled.prefill(pooled.pool_visual(visual), sample.question)
    assert state.prompt_length < tgt.state.prompt_length
    assert state.prompt_length == tgt.state.prompt_length - visual.num_tokens + pooled.pool_visual(visual).num_tokens
    fresh = prefill_sample(target, sample).state
    result = speculative_generate(target, fresh, pooled_drafter(pooled, state, target), max_new_tokens=10, gamma=3)
    assert result.tokens == reference
