"""What a merge method is: the declarations the planners and the engine read, and the chunk it blends.

A method is one module under `methods/` that builds one `MergeMethod` (or a family of them) and
declares on it everything anyone else needs to know: its parameters, how many models it takes and
what it does with a base model, the statistic passes it makes, how a breed's `t` becomes its inputs,
when a tensor is a plain copy of its input, and how much scratch a block costs. `plan/`, `engine.py`
and `methods_cli.py` read these declarations and hold no per-method branches, so a new method is
one file, one line in `methods/__init__.py`'s registry, and its tests (docs/methods.md).

A leaf module: the method modules import it, and the registry imports them.
"""

from __future__ import annotations

import enum
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
class Param:
    """One parameter a method reads: what a manifest may write, and what `darwin-stream methods` shows."""

    name: str
    default: Any = None
    required: bool = False
    doc: str = ""

    @property
    def default_or_required(self) -> Any:
        """The default, or `REQUIRED` for a parameter the manifest must give."""
        return REQUIRED if self.required else self.default


def param(name: str, default: Any = None, doc: str = "", *, required: bool = False) -> Param:
    return Param(name=name, default=default, required=required, doc=doc)


def required(name: str, doc: str = "") -> Param:
    return Param(name=name, required=True, doc=doc)


def doc_summary(doc: str | None, name: str) -> str:
    """The first paragraph of a method module's docstring, without its leading `name / other_name:`."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    head, sep, rest = text.partition(": ")
    return rest if sep and name in head.replace(" / ", " ").split() else text


class BasePolicy(enum.Enum):
    """What a method does with a `base_model` (mergekit's BasePolicy)."""

    NONE = "none"  # no base tensor; a base_model is an input only where the manifest lists it (linear)
    REQUIRED = "required"  # the base is handed to the method apart from the models (ties, slerp)
    OPTIONAL = "optional"  # the base, when given, is the base (nuslerp, multislerp)
    INPUT = "input"  # a base_model is one more ordinary model, appended when not listed (karcher)


@dataclass(frozen=True)
class Arity:
    """How many non-base models a slice may hold (mergekit's InputContract min/max_non_base).

    `message`, where given, is the method's own words for a wrong count, checked first and formatted
    with `inputs` (every input of the slice): "blends exactly 2 models (base_model and one other),
    got {inputs}". The planner checks it before the base, so that the count is the first thing said."""

    least: int = 0
    most: int | None = None
    message: str | None = None

    def admits(self, k: int) -> bool:
        return k >= self.least and (self.most is None or k <= self.most)

    def describe(self) -> str:
        lo, hi = self.least, self.most
        return f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"


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
    """A tensor-wide number, streamed: `passes` rounds of partial (per chunk) -> combine -> finish.

    Partials must be exact (float64 sums, histograms of bit patterns), never samples, so that the
    result does not depend on how the tensor was chunked."""

    # A number, or (tensor shape, resolved params) -> number when it depends on the tensor: della
    # ranks a 1-D tensor in an extra pass, sce's top-k selection costs two passes only when asked for.
    passes: int | Callable[[tuple[int, ...], Params], int]
    partial: Callable[[Chunk, Any], Any]
    combine: Callable[[Sequence[Any]], Any]
    finish: Callable[[Any, Any], Any]
    dtype: torch.dtype = torch.float32  # what the engine upcasts the chunks of a pass to

    def pass_count(self, shape: tuple[int, ...], params: Params) -> int:
        return self.passes if isinstance(self.passes, int) else int(self.passes(shape, params))


class Side(enum.Enum):
    """One of a breed's two parents."""

    FATHER = "father"
    MOTHER = "mother"


@dataclass(frozen=True)
class BreedInputs:
    """A breed blend's inputs in a method's own terms: which parent is each model and the base."""

    models: tuple[Side, ...]
    model_params: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    base: Side | None = None


class BreedError(ValueError):
    """A breed `t` this method cannot take (the planner adds where it was written)."""


@dataclass(frozen=True)
class BreedMap:
    """How a breed's `t` (the mother's share: 0 is the father's tensor, 1 the mother's) becomes a
    method's inputs, and how a template reads `t` back from a planned tensor.

    `searchable` is False where `t` is not a continuous knob (passthrough picks one parent)."""

    inputs: Callable[[float, dict[str, Any], dict[str, Any]], BreedInputs]  # (t, model extras, params)
    read: Callable[[Sequence[Params], Params], float]  # (model_params, params) -> t
    searchable: bool = True


Check = Callable[[Params, Sequence[Params], int], str | None]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and everything it declares about itself."""

    name: str
    blend: Callable[[Chunk, Any], torch.Tensor]  # (chunk, final statistic state or None) -> merged rows
    summary: str = ""  # one line for `darwin-stream methods`
    statistic: Statistic | None = None
    parameters: tuple[Param, ...] = ()  # method-level: the top-level or slice `parameters:`
    model_parameters: tuple[Param, ...] = ()  # per model: under each model's `parameters:`
    base: BasePolicy = BasePolicy.NONE
    arity: Arity = field(default_factory=Arity)
    random: bool = False
    # True when blend (given `Chunk.out`) and the statistic's partial allocate nothing the size of the
    # chunk: the engine then hands them large blocks. Others get small ones, whose temporaries the heap
    # recycles, and `temp_bytes` counts those temporaries.
    inplace: bool = False
    # Bytes per block element of the method's own temporaries, given its number of inputs, beyond the
    # engine's float32 copies of the inputs and the result; None: 0 when inplace, else 8 (n + 3)
    # (deltas, masks, int64 keys, accumulators).
    temporaries: Callable[[int], int] | None = None
    # (method params, per-model params, tensor numel) -> why they cannot be merged, or None. Run by
    # the plan, so that `plan` refuses what `merge` would only find halfway through the tensors.
    check: Check | None = None
    # (method params, per-model params) -> whether the result is the one input unchanged, so that the
    # engine may copy its bytes (when the input is not padded and already has the child's dtype).
    identity: Callable[[Params, Sequence[Params]], bool] | None = None
    breed: BreedMap | None = None
    breed_refusal: str | None = None  # why this method cannot breed, when it has its own reason

    @property
    def param_defaults(self) -> dict[str, Any]:
        """name -> default (`REQUIRED` where the manifest must give it), method-level."""
        return {p.name: p.default_or_required for p in self.parameters}

    @property
    def model_param_defaults(self) -> dict[str, Any]:
        """name -> default (`REQUIRED` where the manifest must give it), per model."""
        return {p.name: p.default_or_required for p in self.model_parameters}

    @property
    def needs_base(self) -> bool:
        return self.base is BasePolicy.REQUIRED

    def uses_base(self, given: bool) -> bool:
        """Whether the plan hands this method a separate base tensor when a base_model is `given`."""
        return self.base is BasePolicy.REQUIRED or (self.base is BasePolicy.OPTIONAL and given)

    @property
    def base_is_input(self) -> bool:
        return self.base is BasePolicy.INPUT

    def pass_count(self, shape: tuple[int, ...], params: Params) -> int:
        """Streaming passes this method's statistic makes over a tensor of `shape`."""
        return 0 if self.statistic is None else self.statistic.pass_count(shape, params)

    def temp_bytes(self, n_inputs: int) -> int:
        if self.temporaries is not None:
            return self.temporaries(n_inputs)
        return 0 if self.inplace else 8 * (n_inputs + 3)

    def is_identity(self, params: Params, model_params: Sequence[Params]) -> bool:
        return self.identity is not None and self.identity(params, model_params)
