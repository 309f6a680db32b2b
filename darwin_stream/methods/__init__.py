"""Merge methods: pure functions over row chunks of the parents' tensors, in one explicit registry.

The engine never sees a whole tensor unless it is small. It hands a method `Chunk`s: the same rows
of the base and of every other model, already upcast to float32 (or float64 in reference tests).

A method is one module that builds a `MergeMethod` (contract.py) declaring all it is: parameters,
arity and base policy, statistic passes, breed mapping, identity copies, scratch. A method whose
result depends on a statistic of the whole tensor (slerp's angle, the ties magnitude threshold,
model_stock's cosines) declares a `Statistic`. The engine then runs its passes over all chunks
before blending: in pass p it calls `partial(chunk, state)` on every chunk, folds the results with
`combine`, and calls `finish(combined, state)` to get the next state. The final state is handed to
`blend`. Partials must be exact (sums in float64, histograms of bit patterns), never samples, so
the result does not depend on how the tensor was chunked.

Randomness (dare_*, della*) must depend only on `Chunk.seed` and each element's flat index in the
whole tensor (`Chunk.offset + i`), never on chunk boundaries (masks.py).

Shared kernels are public modules: select.py (radix selection over float32 bit patterns), masks.py
(counter-based random masks), reduce.py (combining partials, Gram matrices), gta.py (the task
arithmetic family), breeding.py (breed `t` mappings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from darwin_stream.methods import (
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from darwin_stream.methods.contract import (
    REQUIRED,
    Arity,
    BasePolicy,
    BreedError,
    BreedInputs,
    BreedMap,
    Chunk,
    MergeMethod,
    Param,
    Params,
    Side,
    Statistic,
)

__all__ = [
    "COPY", "METHODS", "REGISTRY", "REQUIRED", "Arity", "BasePolicy", "BreedError", "BreedInputs", "BreedMap",
    "Chunk", "MergeMethod", "Param", "Params", "Side", "Statistic", "get", "names", "pass_count", "run_statistic",
]

# The registry: every method darwin-stream knows, in the order mergekit 0.1.5 lists them.
METHODS: tuple[MergeMethod, ...] = (
    linear.LINEAR,
    task_arithmetic.TASK_ARITHMETIC,
    ties.TIES,
    dare.DARE_TIES,
    dare.DARE_LINEAR,
    breadcrumbs.BREADCRUMBS,
    breadcrumbs.BREADCRUMBS_TIES,
    della.DELLA,
    della.DELLA_LINEAR,
    model_stock.MODEL_STOCK,
    slerp.SLERP,
    nuslerp.NUSLERP,
    multislerp.MULTISLERP,
    karcher.KARCHER,
    sce.SCE,
    nearswap.NEARSWAP,
    arcee_fusion.ARCEE_FUSION,
    passthrough.PASSTHROUGH,
    ram.RAM,
    ram.RAMPLUS_TL,
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in METHODS}
assert len(REGISTRY) == len(METHODS), "two methods share a name"

# What a tensor that is not blended (an integer buffer) is planned with: its one input, unchanged.
COPY: MergeMethod = passthrough.PASSTHROUGH


def get(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def names() -> list[str]:
    return sorted(REGISTRY)


def pass_count(stat: Statistic | None, shape: tuple[int, ...], params: Params) -> int:
    """Streaming passes `stat` makes over a tensor of `shape` with resolved `params`."""
    return 0 if stat is None else stat.pass_count(shape, params)


def run_statistic(method: MergeMethod, chunks: Callable[[], Sequence[Chunk]]) -> Any:
    """Reference driver: all passes of `method.statistic` over `chunks()` (called once per pass)."""
    if method.statistic is None:
        return None
    state = None
    first = chunks()[0]
    for _ in range(method.pass_count(first.shape, first.params)):
        parts = [method.statistic.partial(c, state) for c in chunks()]
        state = method.statistic.finish(method.statistic.combine(parts), state)
    return state
