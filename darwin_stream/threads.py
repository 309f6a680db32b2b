"""torch's intra-op thread count, set for a block and put back: one helper for every place that needs it.

On these 2-core machines, shared with other work, one thread per torch op is the fast setting
wherever something else already fills the cores: a demo training step took 3.4 s with 2 threads and
0.20 s with 1; a 0.6B child blended in 24-63 s with 2 threads per op and 4.5-5.5 s with 1 (load
average 7-11); and a disk merge runs one dask task per core already.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


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
