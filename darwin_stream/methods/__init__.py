"""Merge methods: pure functions over row chunks of the parents' tensors, registered by name.

The engine never sees a whole tensor unless it is small. It hands a method `Chunk`s: the same rows
of the base and of every other model, already upcast to float32 (or float64 in reference tests).

A method whose result depends on a statistic of the whole tensor (slerp's angle, the ties magnitude
threshold, model_stock's cosines) declares a `Statistic`. The engine then runs `passes` streaming
passes over all chunks before blending: in pass p it calls `partial(chunk, state)` on every chunk,
folds the results with `combine`, and calls `finish(combined, state)` to get the next state. The
final state is handed to `blend`. Partials must be exact (sums in float64, histograms of bit
patterns), never samples, so the result does not depend on how the tensor was chunked.

Randomness (dare_*) must depend only on `Chunk.seed` and each element's flat index in the whole
tensor (`Chunk.offset + i`), never on chunk boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Params = Mapping[str, Any]


class _Required:
    """Marks a parameter without a default: the manifest must give it (mergekit's `required=True`)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Chunk:
    """The same rows of every input tensor, upcast for the arithmetic."""

    models: Sequence[torch.Tensor]  # one per non-base model, in manifest order
    model_params: Sequence[Params]  # resolved per-model parameters: weight, density, gamma, epsilon, ...
    params: Params  # resolved method-level parameters: t, normalize, lambda, int8_mask, filter_wise, ...
    base: torch.Tensor | None = None
    offset: int = 0  # flat index of this chunk's first element within the whole tensor
    numel: int = 0  # elements in the whole tensor
    shape: tuple[int, ...] = ()  # shape of the whole tensor
    seed: int = 0  # per-tensor seed, derived by the plan from the manifest seed and tensor name
    # Set only for methods declared `inplace`: a buffer shaped like the inputs for the result. The
    # engine then owns every tensor of the chunk as scratch, and the method may overwrite its inputs.
    out: torch.Tensor | None = None


@dataclass(frozen=True)
class Statistic:
    # A number, or (tensor shape, resolved params) -> number when it depends on the tensor: della
    # ranks a 1-D tensor in an extra pass, sce's top-k selection costs two passes only when asked for.
    passes: int | Callable[[tuple[int, ...], Params], int]
    partial: Callable[[Chunk, Any], Any]
    combine: Callable[[Sequence[Any]], Any]
    finish: Callable[[Any, Any], Any]
    dtype: torch.dtype = torch.float32  # what the engine upcasts the chunks of a pass to


@dataclass(frozen=True)
class MergeMethod:
    name: str
    blend: Callable[[Chunk, Any], torch.Tensor]  # (chunk, final statistic state or None) -> merged rows
    statistic: Statistic | None = None
    # True when blend (given `Chunk.out`) and the statistic's partial allocate nothing the size of the
    # chunk: the engine then hands them large blocks. Others get small ones, whose temporaries the heap
    # recycles.
    inplace: bool = False
    needs_base: bool = False
    random: bool = False
    # Parameter names this method reads, with defaults; anything else in a manifest is an error.
    # A default of REQUIRED means the manifest must give it (per-model: for every non-base model).
    model_param_defaults: Mapping[str, Any] = field(default_factory=dict)
    param_defaults: Mapping[str, Any] = field(default_factory=dict)
    # (method params, per-model params, tensor numel) -> why they cannot be merged, or None. Run by
    # the plan, so that `plan` refuses what `merge` would only find halfway through the tensors.
    check: Callable[[Params, Sequence[Params], int], str | None] | None = None
    # How many non-base models a slice may hold (mergekit's InputContract min/max_non_base).
    non_base: tuple[int, int | None] = (0, None)
    # mergekit's BasePolicy.OPTIONAL: a base_model, when given, is the base (nuslerp, multislerp).
    base_optional: bool = False
    # mergekit's BasePolicy.IGNORED with the base appended to the inputs: a base_model is one more
    # ordinary model (karcher averages it with the others).
    base_is_input: bool = False

    def uses_base(self, given: bool) -> bool:
        """Whether the plan hands this method a separate base tensor when a base_model is `given`."""
        return self.needs_base or (self.base_optional and given)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def _load_all() -> None:
    # Importing a method module registers it; kept lazy so `import darwin_stream` stays cheap.
    from darwin_stream.methods import (  # noqa: F401
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


def pass_count(stat: Statistic | None, shape: tuple[int, ...], params: Params) -> int:
    """Streaming passes `stat` makes over a tensor of `shape` with resolved `params`."""
    if stat is None:
        return 0
    return stat.passes if isinstance(stat.passes, int) else int(stat.passes(shape, params))


def run_statistic(method: MergeMethod, chunks: Callable[[], Sequence[Chunk]]) -> Any:
    """Reference driver: all passes of `method.statistic` over `chunks()` (called once per pass)."""
    if method.statistic is None:
        return None
    state = None
    first = chunks()[0]
    for _ in range(pass_count(method.statistic, first.shape, first.params)):
        parts = [method.statistic.partial(c, state) for c in chunks()]
        state = method.statistic.finish(method.statistic.combine(parts), state)
    return state
