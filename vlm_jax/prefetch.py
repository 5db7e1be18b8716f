"""Host-side input preparation ahead of the device: a batch is made while the previous one runs.

A training step or an extraction batch has a host half (tokenising, resizing and normalising
images, padding: the transformers processor, in Python) and a device half (the compiled call).
Run one after the other, the accelerator waits for every batch's host half. `Prefetcher` runs
the host half of the next `depth` batches on one background thread while the caller's thread
dispatches and waits for the current one: the trainer (`TrainConfig.prefetch_batches`) and
`extract_features` (`prefetch=`) use it.

    with Prefetcher(make_batch, range(start, stop), depth=1) as batches:
        for step, batch in batches:   # in key order; make_batch(step + 1) runs meanwhile
            ...

* Order: make(key) runs for the keys in order, one at a time, on one thread, and never for a
  key past the last one, so a deterministic make gives the same values as a plain loop.
* Errors: an exception raised by make(key) is raised by the iteration when it reaches that key
  (the keys before it are delivered first), as a plain loop would.
* depth=0: no thread; make runs on the caller's thread when its key comes up.
* Leaving the `with` block (the end, a break, an exception) cancels the batches not yet begun
  and waits for the one being made, so no thread outlives the loop.
make runs on another thread: it must not use JAX's device state in a way that depends on the
caller's thread (mesh contexts are per thread), which is why callers keep device placement on
their own thread.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, TypeVar

Key = TypeVar("Key")
Value = TypeVar("Value")


def check_depth(depth, what: str = "depth") -> int:
    """depth, if it is a valid number of batches to prepare ahead (an int >= 0)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"{what} is how many batches to prepare ahead, an int >= 0 (0: none); got {depth!r}")
    return depth


class Prefetcher(Generic[Key, Value]):
    """Iterates (key, make(key)) over `keys`, making up to `depth` values ahead on one thread."""

    def __init__(self, make: Callable[[Key], Value], keys: Iterable[Key], depth: int = 1):
        self.make = make
        self.keys = keys
        self.depth = check_depth(depth)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm_jax-prefetch") if depth else None
        self._used = False

    def __enter__(self) -> "Prefetcher[Key, Value]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancels the values not yet begun and waits for the one being made."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[Key, Value]]:
        if self._used:
            raise RuntimeError("a Prefetcher is iterated once; make a new one for another pass")
        self._used = True
        if self._executor is None:
            for key in self.keys:
                yield key, self.make(key)
            return
        upcoming = iter(self.keys)
        pending: collections.deque[tuple[Key, Future]] = collections.deque()

        def submit_until(count: int) -> None:  # the worker makes the submitted keys in order
            while len(pending) < count:
                key = next(upcoming, _END)
                if key is _END:
                    return
                pending.append((key, self._executor.submit(self.make, key)))

        submit_until(self.depth + 1)
        while pending:
            key, future = pending.popleft()
            submit_until(self.depth)  # while the caller has this key, the next `depth` are made
            yield key, future.result()  # make's exception, if any, is raised here, at its key


_END = object()
