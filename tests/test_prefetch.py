"""vlm_jax.prefetch: batches made ahead on one background thread, in order, errors at their key."""

from __future__ import annotations

import threading
import time

import pytest

from vlm_jax.prefetch import Prefetcher


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vlm_jax-prefetch")]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_values_arrive_in_key_order_and_each_key_is_made_once(depth):
    calls = []

    def make(key):
        calls.append(key)
        time.sleep(0.002 * (key % 3))  # uneven work
        return key * key

    with Prefetcher(make, range(7), depth) as batches:
        got = list(batches)
    assert got == [(k, k * k) for k in range(7)]
    assert calls == list(range(7))  # in order, once each, none past the last key
    assert not _prefetch_threads()


def test_the_next_value_is_made_while_the_caller_holds_the_current_one():
    for depth, expected in ((1, True), (0, False)):
        second_made = threading.Event()

        def make(key):
            if key == 1:
                second_made.set()
            return key

        with Prefetcher(make, range(3), depth) as batches:
            for key, _ in batches:
                if key == 0:  # the caller's step: with depth 1, make(1) runs meanwhile
                    assert second_made.wait(timeout=5 if expected else 0.2) is expected


def test_depth_zero_makes_on_the_callers_thread_and_depth_one_on_another():
    for depth, same in ((0, True), (1, False)):
        threads = []
        with Prefetcher(lambda key: threads.append(threading.get_ident()), range(2), depth) as batches:
            list(batches)
        assert all((t == threading.get_ident()) is same for t in threads)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_an_error_is_raised_at_its_key_after_the_keys_before_it(depth):
    def make(key):
        if key == 3:
            raise ValueError("bad example at key 3")
        return key

    got = []
    with pytest.raises(ValueError, match="bad example at key 3"):
        with Prefetcher(make, range(6), depth) as batches:
            for key, value in batches:
                got.append(value)
    assert got == [0, 1, 2]
    assert not _prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2])
def test_exactly_depth_values_are_made_ahead_of_the_caller(depth):
    calls = []
    with Prefetcher(lambda key: calls.append(key), range(10), depth) as batches:
        for key, _ in batches:
            time.sleep(0.05)  # a step long enough for the thread to make all it was given
            assert max(calls) == min(key + depth, 9)


def test_leaving_early_cancels_what_has_not_begun_and_joins_the_thread():
    calls = []

    def make(key):
        calls.append(key)
        time.sleep(0.05)
        return key

    with Prefetcher(make, range(100), depth=2) as batches:
        for key, _ in batches:
            if key == 1:
                break
    assert not _prefetch_threads()
    assert max(calls) <= 1 + 2  # the consumed keys plus at most `depth` ahead
    assert calls == sorted(calls)


def test_bad_depth_and_reuse():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="how many batches to prepare ahead, an int >= 0"):
            Prefetcher(lambda k: k, range(2), bad)
    batches = Prefetcher(lambda k: k, range(2), 1)
    with batches:
        list(batches)
        with pytest.raises(RuntimeError, match="iterated once"):
            list(batches)
