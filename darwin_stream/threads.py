"""torch's intra-op thread count, set for a block and put back: one helper for every place that needs it.

On these 2-core machines, shared with other work, one thread per torch op is the fast setting
wherever something else already fills the cores: a demo training step took 3.4 s with 2 threads and
0.20 s with 1; a 0.6B child blended in 24-63 s with 2 threads per op and 4.5-5.5 s with 1 (load
average 7-11); and a disk merge runs one dask task per core already.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class PerThread(Generic[T]):
    """One object per thread, made on first use, which any thread can drop for all of them.

    Not `threading.local`: a merge's end (engine.release_scratch) must drop the buffers of dask's
    pool threads, which stay alive between merges, from the thread that ran the merge.
    """

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._by_thread: dict[int, T] = {}
        self._lock = threading.Lock()

    def get(self) -> T:
        key = threading.get_ident()
        got = self._by_thread.get(key)
        if got is None:
            with self._lock:
                got = self._by_thread[key] = self._make()
        return got

    def values(self) -> list[T]:
        with self._lock:
            return list(self._by_thread.values())

    def clear(self) -> None:
        with self._lock:
            self._by_thread.clear()


@contextlib.contextmanager
def torch_threads(n: int | None = 1) -> Iterator[None]:
    """Run the block with `n` torch threads (None: leave torch's setting alone)."""
    import torch  # here: `darwin-stream --help` imports the modules that use this, and must not load torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
