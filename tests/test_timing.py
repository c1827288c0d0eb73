"""Tests for common/timing.py: synced timers, stage accumulation, event timer, shared clock."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from common.timing import Clock, Timer, sync, timer


def test_sync_cpu_is_noop() -> None:
    sync(None)
    sync("cpu")
    sync(torch.device("cpu"))


def test_timer_nonnegative() -> None:
    with timer("cpu") as t:
        time.sleep(0.01)
    assert t.seconds >= 0.009 and t.ms == pytest.approx(t.seconds * 1000)
    t2 = Timer().start()
    assert t2.stop() >= 0
    with pytest.raises(RuntimeError):
        Timer().stop()


def test_clock_two_threads() -> None:
    clock = Clock()
    barrier = threading.Barrier(2)

    def work(lane: str) -> None:
        barrier.wait()
        s = clock.now()
        time.sleep(0.02)
        clock.record("prefill", s, clock.now(), lane=lane)
        with clock.span("decode", lane):
            time.sleep(0.005)

    threads = [threading.Thread(target=work, args=(lane,), name=lane) for lane in ("draft", "target")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ivs = clock.intervals
    assert len(ivs) == 4
    assert {i["lane"] for i in ivs} == {"draft", "target"}
    assert all(set(i) >= {"label", "start", "end", "lane", "thread"} for i in ivs)
    assert all(0 <= i["start"] <= i["end"] for i in ivs)
    assert [i["start"] for i in ivs] == sorted(i["start"] for i in ivs)
    pre = {i["lane"]: i for i in ivs if i["label"] == "prefill"}
    # the two prefills overlap on the shared timeline
    assert pre["draft"]["start"] < pre["target"]["end"] and pre["target"]["start"] < pre["draft"]["end"]
    ms = clock.intervals_ms()
    assert ms[0]["end"] == pytest.approx(ivs[0]["end"] * 1000)


def test_clock_lane_defaults_to_thread_and_reset() -> None:
    clock = Clock()
    item = clock.record("x", 0.0, 0.1)
    assert item["lane"] == threading.current_thread().name
    with clock.span("y", "lane1") as out:
        pass
    assert out["end"] >= out["start"] >= 0 and out["lane"] == "lane1"
    clock.reset()
    assert clock.intervals == [] and clock.now() >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clock_spans_on_two_streams() -> None:
    clock = Clock()
    streams = {"draft": torch.cuda.Stream(), "target": torch.cuda.Stream()}
    xs = {k: torch.randn(2048, 2048, device="cuda") for k in streams}
    torch.cuda.synchronize()

    def work(lane: str) -> None:
        s = streams[lane]
        with torch.cuda.stream(s), clock.span("prefill", lane, stream=s):
            x = xs[lane]
            for _ in range(20):
                x = (x @ x) / 2048

    threads = [threading.Thread(target=work, args=(k,)) for k in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ivs = clock.intervals
    assert {i["lane"] for i in ivs} == {"draft", "target"}
    assert all(i["end"] > i["start"] >= 0 for i in ivs)
    with timer("cuda") as t:
        torch.randn(1024, 1024, device="cuda").sum()
    assert t.seconds > 0


def test_gc_paused_keeps_the_collector_off_inside_and_restores_it():
    import gc

    from common.timing import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.unfreeze()
