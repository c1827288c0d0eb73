"""common.prefetch: order, look-ahead, errors and early exit."""

from __future__ import annotations

import threading
import time

import pytest

from common.prefetch import prefetched


def test_items_come_in_order_with_their_prepared_values():
    assert list(prefetched(range(7), lambda x: x * x, depth=2)) == [(x, x * x) for x in range(7)]


def test_preparation_runs_ahead_on_another_thread():
    main, seen = threading.get_ident(), []

    def prepare(x):
        seen.append((x, threading.get_ident() != main))
        return x

    for x, _ in prefetched(range(5), prepare, depth=2):
        if x == 0:
            time.sleep(0.05)
            assert [s for s, _ in seen][:3] == [0, 1, 2]  # items 1 and 2 were prepared while 0 was in use
    assert all(other for _, other in seen)


def test_an_error_surfaces_at_its_item_and_an_early_exit_cancels_the_rest():
    def prepare(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for x, _ in prefetched(range(10), prepare, depth=1):
            got.append(x)
    assert got == [0, 1, 2]
    started = []
    for x, _ in prefetched(range(100), lambda x: started.append(x) or x, depth=2):
        if x == 1:
            break
    assert len(started) <= 5
