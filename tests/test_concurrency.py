"""Two models on one GPU (issue 15, item 5): the options, the graphed prefill and the probe's logic on the CPU."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from benchmark_inference.concurrency_probe import (
    best_variant,
    ensure_checkpoints,
    in_process_variants,
    probe_in_process,
    wanted,
)
from common.concurrency import (
    ConcurrencyOptions,
    green_context,
    lane_stream,
    prepare_draft,
    switch_interval,
)
from common.errors import DataError
from common.models.graphed_prefill import GraphedPrefill
from common.models.loader import load_vlm
from tests.data_fixtures import tiny_dataset  # noqa: F401  (session fixture)


class _FakeGraph:
    """A CPU stand-in for a CUDA graph: replay reruns the function into the captured output tensors."""

    def __init__(self, fn, outputs):
        self.fn, self.outputs, self.replays = fn, outputs, 0

    def replay(self):
        logits, hidden = self.fn()
        self.outputs[0].copy_(logits)
        for i, h in hidden.items():
            self.outputs[1][i].copy_(h)
        self.replays += 1


CAPTURED: list[_FakeGraph] = []


def _fake_capture(fn, device):
    outputs = fn()
    CAPTURED.append(_FakeGraph(fn, outputs))
    return CAPTURED[-1], outputs


@pytest.fixture(scope="module")
def pair(tiny_models_dir):
    return (load_vlm("eventgpt", tiny_models_dir / "eventgpt", quant="fp32", device="cpu"),
            load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cpu"))


def test_graphed_prefill_gives_the_eager_prefill_and_refreshes_its_input(pair):
    runner = pair[0].runner
    CAPTURED.clear()
    graphed = GraphedPrefill(runner, max_lengths=1, capture=_fake_capture)
    h = runner.shape.hidden_size
    torch.manual_seed(0)
    cache = runner.new_cache(16, torch.float32, torch.device("cpu"))  # the static cache: one for every prefill
    with torch.no_grad():
        for embeds in (torch.randn(7, h), torch.randn(7, h)):  # the second replay must read the new input
            eager_cache = runner.new_cache(16, torch.float32, torch.device("cpu"))
            eager, eager_hidden = runner.run(embeds, eager_cache, (1, -1), all_logits=False)
            cache.length = 0
            logits, hidden = graphed(embeds, cache, (1, -1))
            assert torch.allclose(logits, eager, atol=1e-5)
            assert set(hidden) == {1, -1} and torch.allclose(hidden[1], eager_hidden[1], atol=1e-5)
            assert cache.length == 7 and torch.allclose(cache.keys[:, :, :, :7], eager_cache.keys[:, :, :, :7])
        assert graphed.lengths == 1 and [g.replays for g in CAPTURED] == [2]  # one capture served both prefills
        assert graphed(torch.randn(7, h), cache) is None  # a cache that is not empty: eager
        cache.length = 0
        assert graphed(torch.randn(5, h), cache) is None  # a second length over the cap of 1: eager
    assert graphed(torch.randn(7, h), cache) is None  # with autograd on: eager


def test_concurrency_options_on_the_cpu(pair):
    draft, _ = pair
    assert lane_stream(torch.device("cpu"), "draft", -1) is None
    before = sys.getswitchinterval()
    with switch_interval(0.0007):
        assert sys.getswitchinterval() == pytest.approx(0.0007)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError, match="green contexts"):
        with green_context(torch.device("cpu"), 16):
            pass
    assert prepare_draft(draft, ConcurrencyOptions(graph_draft_prefill=True)) is False  # no graphs on the CPU
    with pytest.raises(ValueError, match="CUDA"):
        draft.enable_prefill_graphs()
    assert ConcurrencyOptions(draft_sms=32).describe()["draft_sms"] == 32


def test_variants_and_how_the_best_is_chosen():
    variants = in_process_variants([16], [5.0], [112])
    assert variants["d_green_target_112"].target_sms == 112 and variants["d_green_target_112"].draft_sms is None
    assert list(variants)[-2:] == ["d_green_16", "d_green_target_112"]  # green contexts last
    assert variants["d_green_16"].draft_sms == 16 and variants["e_head_start_5"].head_start_s == pytest.approx(0.005)
    assert variants["b_draft_graphs"].graph_draft_prefill and variants["a_threads_priority"].draft_priority == -1
    assert wanted("b_draft_graphs_switch", "b") and wanted("a0_threads", "a0") and not wanted("a0_threads", "a")
    assert wanted("c_processes_mps", "c_processes_mps,d") and not wanted("c_processes", "c_processes_mps")
    results = {"fast_no_tokens": {"concurrent_prefill_slowdown": 1.02, "free_draft_tokens": 0.0},
               "tokens_too_slow": {"concurrent_prefill_slowdown": 1.6, "free_draft_tokens": 12.0},
               "tokens_in_goal": {"concurrent_prefill_slowdown": 1.12, "free_draft_tokens": 3.0},
               "broken": {"failed": "RuntimeError: x"}}
    assert best_variant(results) == "tokens_in_goal"
    del results["tokens_in_goal"]
    assert best_variant(results) == "fast_no_tokens"
    assert best_variant({"broken": {"failed": "x"}}) is None


def test_probe_in_process_on_the_cpu(pair):
    draft, target = pair
    variants = {"a0_threads": ConcurrencyOptions(), "e_head_start_50": ConcurrencyOptions(head_start_s=0.05),
                "d_green_8": ConcurrencyOptions(draft_sms=8)}
    seen = []
    out = probe_in_process(draft, target, variants, repeats=1, max_free=3, write=seen.append)
    assert len(seen) == 3 and out["target_prefill_alone_ms"] > 0 and out["draft_prefill_alone_ms"] > 0
    assert out["draft_step_alone_ms"] > 0
    assert out["variants"]["d_green_8"]["failed"].startswith("RuntimeError")  # no green contexts on the CPU
    for name in ("a0_threads", "e_head_start_50"):
        row = out["variants"][name]
        assert row["concurrent_prefill_slowdown"] == pytest.approx(
            row["target_prefill_concurrent_ms"] / out["target_prefill_alone_ms"])
        assert 0 <= row["free_draft_tokens"] <= row["draft_tokens"] <= 3
        assert len(row["rounds"]) == 1 and row["draft_prefill_graphed"] is False
        assert row["draft_prefill_launched_ms"] <= row["draft_prefill_end_ms"]
        assert 0 < row["target_launched_ms"] <= row["target_prefill_concurrent_ms"]
    assert out["variants"]["e_head_start_50"]["draft_start_ms"] < 0  # the draft started before the target


def test_draft_figures_of_a_round():
    from benchmark_inference.concurrency_processes import draft_figures

    # target 10.000 -> 10.070 s; draft queued its prefill at 10.005, done at 10.030, tokens every 10 ms, then 5 ms
    out = draft_figures(10.0, 10.070, 9.990, 10.005, 10.030, [10.040, 10.050, 10.060, 10.075, 10.080])
    assert out["draft_start_ms"] == pytest.approx(-10) and out["draft_prefill_launched_ms"] == pytest.approx(5)
    assert out["draft_prefill_end_ms"] == pytest.approx(30)
    assert out["free_draft_tokens"] == 3 and out["draft_tokens"] == 5
    assert out["draft_step_ms_in_window"] == pytest.approx(10) and out["draft_step_ms_after"] == pytest.approx(5)
    assert draft_figures(0.0, 0.01, 0.0, 0.0, 0.02, [])["draft_step_ms_in_window"] != \
        draft_figures(0.0, 0.01, 0.0, 0.0, 0.02, [])["draft_step_ms_in_window"]  # NaN: no step in the window


def test_probe_refuses_a_folder_without_checkpoints_on_the_cpu(tmp_path):
    with pytest.raises(DataError, match="--models_dir"):
        ensure_checkpoints(tmp_path, "cpu")


def test_process_per_model_on_the_cpu(tiny_models_dir):
    from benchmark_inference.concurrency_processes import ProcessLaneConfig, run_process_variant

    cfg = ProcessLaneConfig(models_dir=str(tiny_models_dir), device="cpu", quant="fp32", max_free=3, alone_tokens=3)
    out = run_process_variant(cfg, repeats=1, timeout_s=240, on_ready=lambda: {"ready": True})
    assert "failed" not in out, out
    assert out["ready"] is True and len(out["rounds"]) == 1
    assert out["concurrent_prefill_slowdown"] == pytest.approx(
        out["target_prefill_concurrent_ms"] / out["target_prefill_alone_ms"])
    assert 0 <= out["free_draft_tokens"] <= out["draft_tokens"] <= 3
    assert out["draft_prefill_alone_ms"] > 0 and out["draft_step_alone_ms"] > 0


@pytest.mark.gpu
def test_graphed_prefill_matches_the_eager_prefill_on_the_gpu(tiny_models_dir):
    draft = load_vlm("eventgpt", tiny_models_dir / "eventgpt", quant="fp32", device="cuda")
    from benchmark_inference.real_shape_timing import raw_inputs

    with torch.no_grad():
        visual = draft.encode_pixels(draft.preprocess(raw_inputs("eventgpt")))
        draft.enable_cuda_graphs(1024, step_sizes=(1,))
        eager = draft.prefill(visual, "What is here?", hidden_layers=(-1,))
        eager_logits, eager_next = eager.logits.clone(), draft.forward(eager, [5]).clone()
        draft.enable_prefill_graphs()
        for _ in range(2):  # capture, then replay
            state = draft.prefill(visual, "What is here?", hidden_layers=(-1,))
            assert torch.allclose(state.logits, eager_logits, atol=1e-4)
            assert torch.allclose(draft.forward(state, [5]), eager_next, atol=1e-4)
        assert draft.prefill_graphs.lengths == 1


def test_run_parallel_with_concurrency_options_stays_lossless(pair, tiny_dataset):  # noqa: F811
    from common.data import ClipDataset
    from common.drafters import DrafterFactory
    from common.parallel import run_parallel
    from common.pipeline import prefill_sample
    from common.speculative import autoregressive_generate

    draft, target = pair
    sample = ClipDataset(tiny_dataset)[0]
    options = ConcurrencyOptions(draft_priority=-1, graph_draft_prefill=True, head_start_s=0.05,
                                 switch_interval_s=0.001)
    before = sys.getswitchinterval()
    out = run_parallel(draft, target, sample, DrafterFactory("eventgpt"), max_new_tokens=10, gamma=3,
                       max_free_tokens=4, concurrency=options)
    with torch.no_grad():
        alone = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=10)
    assert out.result.tokens == alone.tokens
    assert sys.getswitchinterval() == before
    starts = {lane: min(i["start"] for i in out.intervals if i["lane"] == lane and i["label"] == "stage1")
              for lane in ("draft", "target")}
    assert starts["target"] - starts["draft"] > 0.04  # the draft's head start


def test_concurrency_flag_names():
    from common.concurrency import named_options
    from common.flags import concurrency_spec

    assert named_options(None) == ConcurrencyOptions() == named_options("threads")
    assert named_options("draft_graphs").graph_draft_prefill and named_options("draft_graphs").draft_priority < 0
    custom = named_options("draft_graphs, head_start_ms=20,target_sms=112,switch_ms=0.5,graph_prefill=0")
    assert custom == ConcurrencyOptions(draft_priority=-1, graph_draft_prefill=False, target_sms=112,
                                        head_start_s=0.02, switch_interval_s=0.0005)
    for bad in ("fast", "threads,speed=2", "threads,target_sms=lots", "threads,head_start_ms"):
        with pytest.raises(ValueError, match="--concurrency"):
            named_options(bad)
    assert concurrency_spec("threads,priority=-1") == "threads,priority=-1"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown name 'fast'"):
        concurrency_spec("fast")


@pytest.mark.gpu
def test_run_parallel_with_the_draft_graphed_is_lossless_on_the_gpu(tiny_models_dir, tiny_dataset):  # noqa: F811
    """The first run captures the draft's prefill graph while the target prefills; both runs stay lossless."""
    from common.concurrency import named_options
    from common.data import ClipDataset
    from common.drafters import DrafterFactory
    from common.parallel import run_parallel
    from common.pipeline import configure_decode, prefill_sample
    from common.speculative import autoregressive_generate

    draft = load_vlm("eventgpt", tiny_models_dir / "eventgpt", quant="fp32", device="cuda")
    target = load_vlm("videollava", tiny_models_dir / "videollava", quant="fp32", device="cuda")
    sample = ClipDataset(tiny_dataset)[0]
    with torch.no_grad():
        plain = autoregressive_generate(target, prefill_sample(target, sample).state, max_new_tokens=16)
        assert configure_decode((draft, target), "cuda_graph", max_length=1024, gamma=3) == "cuda_graph"
        for _ in range(2):
            out = run_parallel(draft, target, sample, DrafterFactory("eventgpt"), max_new_tokens=16, gamma=3,
                               concurrency=named_options("draft_graphs"))
            assert out.result.tokens == plain.tokens
        assert draft.prefill_graphs is not None and draft.prefill_graphs.lengths == 1
