"""The manifest: a mergekit YAML, read unchanged, plus darwin-stream's own optional sections.

Users arrive with mergekit configs they already trust, so every mergekit key this project supports
means exactly what it means in mergekit (see docs/manifest.md). What we cannot honour (union
tokenizers, multi-module configs) is refused by name rather than silently ignored: a merge that
differs from what the user asked for is worse than one that does not start.

Every failure is a `ManifestError` with one line, `manifest: <field path>: <what was expected>`, so
the CLI can print it without a traceback.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from darwin_stream import dtypes
from darwin_stream.bounded import clip, show
from darwin_stream.errors import DarwinError, ManifestError

# --------------------------------------------------------------------------------------------
# Parameter settings: a scalar, a gradient, or filtered values (mergekit's ParameterSetting).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditional:
    """One `{filter: ..., value: ...}` entry; filter None (or "*") matches every tensor."""

    filter: str | None
    value: float | bool | tuple[float, ...]


# A parsed setting: float | bool (scalar), tuple[float, ...] (gradient), list[Conditional].
Setting = Any

_EXPECTED_SETTING = "expected a number, a list of numbers (gradient) or filtered values"


def _fail(msg: str, sub: str = "") -> PydanticCustomError:
    """A validation error that carries a sub-path below the field pydantic knows about."""
    return PydanticCustomError("darwin", "{msg}", {"msg": msg, "sub": sub})


def _number(v: Any, sub: str) -> float | bool:
    """A scalar parameter. Numeric strings are accepted because PyYAML reads `1e-3` as a string
    (YAML 1.1 wants `1.0e-3`) and mergekit's pydantic coerces it; anything else is refused."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            raise _fail(f"{_EXPECTED_SETTING}, got {show(v)}", sub) from None
    else:
        raise _fail(f"{_EXPECTED_SETTING}, got {show(v)}", sub)
    if not math.isfinite(f):
        raise _fail(f"expected a finite number, got {show(v)}", sub)
    return f


def _scalar_or_gradient(v: Any, sub: str) -> float | bool | tuple[float, ...]:
    if isinstance(v, list):
        if not v:
            raise _fail("a gradient needs at least one value, got []", sub)
        out = []
        for i, e in enumerate(v):
            if isinstance(e, bool | dict | list):
                raise _fail(f"expected a number in a gradient, got {show(e)}", f"{sub}[{i}]")
            out.append(float(_number(e, f"{sub}[{i}]")))
        return tuple(out)
    if isinstance(v, dict):
        raise _fail(f"{_EXPECTED_SETTING}, got {show(v)}", sub)
    return _number(v, sub)


def _conditional(v: dict, sub: str) -> Conditional:
    extra = set(v) - {"filter", "value"}
    if extra:
        raise _fail(f"unknown key {show(sorted(extra)[0])} (expected filter, value)", sub)
    if "value" not in v:
        raise _fail("filtered value needs a 'value'", sub)
    flt = v.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise _fail(f"expected a string filter such as self_attn or mlp, got {show(flt)}", f"{sub}.filter")
    return Conditional(flt, _scalar_or_gradient(v["value"], f"{sub}.value"))


def parse_setting(v: Any) -> Setting:
    """mergekit's ParameterSetting: scalar | list of numbers | {filter, value} | list of those."""
    if isinstance(v, dict):
        return [_conditional(v, "")]
    if isinstance(v, list) and v and any(isinstance(e, dict) for e in v):
        out = []
        for i, e in enumerate(v):
            if not isinstance(e, dict):
                raise _fail(
                    f"expected {{filter: ..., value: ...}} in a list of filtered values, got {show(e)}", f"[{i}]"
                )
            out.append(_conditional(e, f"[{i}]"))
        return out
    return _scalar_or_gradient(v, "")


ParamSetting = Annotated[Any, BeforeValidator(parse_setting)]
Parameters = dict[str, ParamSetting]


def interpolate(values: tuple[float, ...], t: float) -> float:
    """A gradient at position t in [0, 1]: piecewise-linear over evenly spaced anchors.

    Written as mergekit writes it (index = t * (n - 1), blend the two neighbours) rather than
    with np.interp, so the floating point result is the one mergekit computes.
    """
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Setting, matches: Any, t: float) -> float | bool | None:
    """The value of a setting for one tensor at gradient position t; None when no filter matched.

    `matches(filter) -> bool` says whether a filter selects the tensor; None from here makes the
    caller fall back to the next, less specific level, exactly as mergekit's ConfigReader does.
    """
    if isinstance(setting, tuple):
        return interpolate(setting, t)
    if isinstance(setting, list):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or matches(cond.filter):
                return evaluate(cond.value, matches, t)
        return None
    return setting


# --------------------------------------------------------------------------------------------
# Sizes and small values.
# --------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[f"{_p}b"] = _UNITS[_p] = 1000**_i
    _UNITS[f"{_p}ib"] = _UNITS[f"{_p}i"] = 1024**_i


def parse_size(v: Any) -> int:
    """'1GiB' -> 1073741824, '5GB' -> 5000000000, 123 -> 123.

    Both spellings exist in the wild (mergekit's --out-shard-size says 5B meaning decimal), so
    decimal and binary suffixes are both accepted and mean what the SI/IEC standards say.
    """
    if isinstance(v, bool):
        raise ValueError(f"expected a size such as 1GiB, 512MiB or 5GB, got {show(v)}")
    if isinstance(v, int):
        n = v
    else:
        m = _SIZE.match(str(v)) if isinstance(v, str | float) else None
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size such as 1GiB, 512MiB or 5GB, got {show(v)}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"expected a positive size, got {show(v)}")
    return n


def _size(v: Any) -> int:
    try:
        return parse_size(v)
    except ValueError as e:
        raise _fail(str(e)) from None


def _model_ref(v: Any) -> str:
    """A model reference as mergekit accepts it: 'path', 'path@revision', 'path+lora', or
    {model: ..., lora: ...}; a LoRA is applied by rows as the parent is read (lora.py), so the
    reference becomes the spec 'model+lora' that pool.open_parent opens."""
    if isinstance(v, dict):
        extra = set(v) - {"model", "lora", "override_architecture"}
        if extra:
            raise _fail(f"unknown key {show(sorted(extra)[0])} (expected model, lora)")
        if v.get("override_architecture"):
            raise _fail("override_architecture is not supported")
        model = _model_path(v.get("model"))
        return f"{model}+{_model_path(v['lora'])}" if v.get("lora") else model
    if not isinstance(v, str) or not v.strip():
        raise _fail(f"expected a path or repo id, got {show(v)}")
    v = v.strip()
    if "+" in v and not os.path.exists(v):  # mergekit's ModelReference: model+lora, split at the '+'
        parts = v.split("+")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise _fail(f"expected model or model+lora (one '+'), got {show(v)}")
        return "+".join(_local_revision(p.strip()) for p in parts)
    return _local_revision(v)


def _model_path(v: Any) -> str:
    """mergekit's ModelPath: 'path', 'path@revision' or {path: ..., revision: ...}."""
    if isinstance(v, dict):
        path, rev = v.get("path"), v.get("revision")
        if not isinstance(path, str) or set(v) - {"path", "revision"}:
            raise _fail(f"expected a path or repo id, got {show(v)}")
        return _local_revision(f"{path}@{rev}") if rev else path
    if not isinstance(v, str) or not v.strip() or ("+" in v and not os.path.exists(v)):
        raise _fail(f"expected a path or repo id, got {show(v)}")
    return _local_revision(v.strip())


def _local_revision(v: str) -> str:
    """'path@revision' as mergekit's ModelPath reads it: split at the one '@'; a path that exists
    locally is read as it is (mergekit passes the revision only to the hub's snapshot_download),
    and a hub id keeps its revision for sources.resolve_hub. A path that exists under its full
    name, '@' included, is that path."""
    if "@" not in v or os.path.exists(v):
        return v
    if v.count("@") > 1:
        raise _fail(f"expected path or path@revision (one '@'), got {show(v)}")
    path, rev = v.split("@")
    if not path or not rev:
        raise _fail(f"expected path@revision with both parts, got {show(v)}")
    return path if os.path.exists(path) else v


ModelRef = Annotated[str, BeforeValidator(_model_ref)]
Size = Annotated[int, BeforeValidator(_size)]


def _dtype(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise _fail(f"expected one of bfloat16, float16, float32, float64, got {show(v)}")
    try:
        return dtypes.parse(v)
    except DarwinError:
        raise _fail(f"expected one of bfloat16, float16, float32, float64, got {show(v)}") from None


DType = Annotated[str | None, BeforeValidator(_dtype)]


# --------------------------------------------------------------------------------------------
# The sections.
# --------------------------------------------------------------------------------------------


class Section(BaseModel):
    """Unknown keys are refused with the list of known ones: a typo must not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise _fail(f"expected a mapping, got {show(data)}")
        known = {f.alias or n for n, f in cls.model_fields.items()}
        for key in data:
            if key not in known:
                raise _fail(f"unknown key (expected one of {', '.join(sorted(known))})", str(key))
        return data


class InputModel(Section):
    model: ModelRef
    parameters: Parameters | None = None


def _layer_range(v: Any) -> tuple[int, int]:
    """mergekit's [start, end): end exclusive, start < end."""
    ok = (
        isinstance(v, list | tuple)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        and 0 <= v[0] < v[1]
    )
    if not ok:
        raise _fail(f"expected [start, end] with 0 <= start < end (end exclusive), got {show(v)}")
    return (v[0], v[1])


class InputSlice(Section):
    model: ModelRef
    layer_range: Annotated[tuple[int, int], BeforeValidator(_layer_range)]
    parameters: Parameters | None = None


class OutputSlice(Section):
    sources: list[InputSlice]
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputSlice:
        if not self.sources:
            raise _fail("expected at least one source", "sources")
        if self.residual_weight is not None:
            raise _fail("residual_weight is not supported", "residual_weight")
        return self


def _tokenizer_source(v: Any) -> str:
    """mergekit's tokenizer source: union, base, or a model reference (a model of this merge)."""
    if v in ("union", "base"):
        return v
    try:
        return _model_ref(v)
    except PydanticCustomError:
        raise _fail(f"expected union, base or a model of this merge, got {show(v)}") from None


TokenizerSource = Annotated[str, BeforeValidator(_tokenizer_source)]


class ZeroEmbedding(Section):
    kind: Literal["zero"]


class ModelTokenEmbedding(Section):
    """A token's row taken from another token (by text or id) of one model."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise _fail("give exactly one of token or token_id", "token")
        if self.token_id is not None and self.token_id < 0:
            raise _fail(f"expected a token id >= 0, got {self.token_id}", "token_id")
        return self


def _embedding_source(v: Any) -> Any:
    """`source:` of a token: a model reference, {kind: zero} or {kind: model_token, ...}."""
    if v is None or not isinstance(v, dict) or "kind" not in v:
        return v if v is None else _model_ref(v)
    if v["kind"] == "zero":
        return ZeroEmbedding.model_validate(v)
    if v["kind"] == "model_token":
        return ModelTokenEmbedding.model_validate(v)
    raise _fail(f"expected kind zero or model_token, got {show(v['kind'])}", "kind")


class TokenEmbedding(Section):
    """How one token's embedding and lm_head rows are made (mergekit's TokenEmbeddingConfig)."""

    source: Annotated[Any, BeforeValidator(_embedding_source)] = None
    force: bool = False  # use `source` for every model, even those that have the token

    @model_validator(mode="after")
    def _check(self) -> TokenEmbedding:
        if self.force and self.source is None:
            raise _fail("force needs a source (a model, {kind: zero} or {kind: model_token, ...})", "force")
        return self


class TokenizerSection(Section):
    """mergekit's `tokenizer:` section; its source defaults to union, as in mergekit."""

    source: TokenizerSource = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizerSection:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise _fail(f"expected a positive integer, got {self.pad_to_multiple_of}", "pad_to_multiple_of")
        for tok in self.tokens or {}:
            if not tok:
                raise _fail("a token must be a non-empty string", "tokens")
        return self


def _chat_template(v: Any) -> str | None:
    """mergekit's rule: a short name of a shipped template (or auto), or a Jinja template."""
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise _fail(f"expected a template name (auto, {', '.join(CHAT_TEMPLATE_NAMES)}) or a Jinja template, got {show(v)}")
    if v == "auto" or v in CHAT_TEMPLATE_NAMES:
        return v
    if len(v) < 20 or "{" not in v:
        raise _fail(f"unknown chat template {show(v)} (expected auto, one of {', '.join(CHAT_TEMPLATE_NAMES)}, "
                    "or a Jinja template)")
    return v


# The names mergekit 0.1.5 ships (darwin_stream.tokenizer.chat holds darwin-stream's own text for each).
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


class DarwinSection(Section):
    """darwin-stream's own options; the CLI's flags override them."""

    memory_budget: Size = 2**30
    shard_size: Size = 5 * 10**9
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    format: Literal["safetensors", "zarr"] = "safetensors"
    out_dtype: DType = None
    direct_io: bool = True  # write shards with O_DIRECT where the filesystem allows it
    allow_nonfinite: bool = False  # merge parents holding NaN/Inf (and let the child hold them)
    # fsspec options for URL outputs (storage.py); kept out of the plan and the model card
    storage_options: dict[str, Any] | None = None


# --- the breed section (its planner is plan/breed.py) -------------------------------------------


class Gradient(BaseModel):
    """`{gradient: [...]}`: values spread evenly across the father's layers and interpolated."""

    model_config = ConfigDict(extra="forbid")
    gradient: list[float] = Field(min_length=1)


Gene = float | list[float] | Gradient


class BlendSpec(BaseModel):
    """How one role or group is blended. Extra keys are the method's own parameters (density, ...)."""

    model_config = ConfigDict(extra="allow")
    method: str = "linear"
    t: Gene

    @field_validator("t")
    @classmethod
    def _finite(cls, v: Gene) -> Gene:
        values = v.gradient if isinstance(v, Gradient) else v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("expected a number, a list with one value per father layer, or {gradient: [...]}")
        if not all(math.isfinite(x) for x in values):
            raise ValueError("t must be finite")
        return v

    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class BreedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    father: str
    mother: str
    keep: Literal["father"] = "father"
    blend: dict[str, BlendSpec] = {}
    layer_map: Literal["linear"] | list[int | None] = "linear"
    # Adapters for architectures darwin-stream does not know: a YAML file path or a list of adapters.
    adapters: str | list[dict[str, Any]] | None = None


class GeneSection(Section):
    """One gene: a numeric merge or breed parameter that the search sets, at some granularity.

    `param` names a parameter of the template (a model's `weight` or `density`, slerp's `t`, a breed
    blend's `t`); `model` picks the model for a per-model parameter; `filter` restricts the gene to
    the tensors mergekit's filter rule selects (a substring, role or group: self_attn, mlp, embed).
    """

    name: str | None = None
    param: str
    model: str | None = None
    filter: list[str] | str | None = None
    granularity: Literal["global", "role", "layer", "block"] = "global"
    block: int | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    init: float | list[float] | None = None
    tie: str | None = None
    negate: bool = False

    @model_validator(mode="after")
    def _check(self) -> GeneSection:
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _fail("bounds must be finite", "bounds")
        if lo >= hi:
            raise _fail(f"bounds are inverted or empty: [{lo}, {hi}] (expected [low, high] with low < high)", "bounds")
        if self.granularity == "block" and (self.block is None or self.block < 1):
            raise _fail("granularity block needs block: k (k >= 1 consecutive layers per value)", "block")
        if self.granularity != "block" and self.block is not None:
            raise _fail("block: k applies only to granularity: block", "block")
        if self.granularity == "role" and not self.filters:
            raise _fail("granularity role needs filter: a list of roles or groups, one value each", "filter")
        if self.negate and self.tie is None:
            raise _fail("negate applies only to a tied gene (tie: NAME)", "negate")
        inits = self.init if isinstance(self.init, list) else [] if self.init is None else [self.init]
        for v in inits:
            if not (math.isfinite(v) and lo <= v <= hi):
                raise _fail(f"initial value {v} lies outside bounds [{lo}, {hi}]", "init")
        return self

    @property
    def filters(self) -> tuple[str, ...]:
        if self.filter is None:
            return ()
        return (self.filter,) if isinstance(self.filter, str) else tuple(self.filter)


class SearchSection(Section):
    """CMA-ES settings. The loop enforces the caps itself (cma checks maxfevals per generation)."""

    popsize: int = 8
    sigma0: float = 0.25
    max_generations: int = 12
    max_evaluations: int | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SearchSection:
        if self.popsize < 2:
            raise _fail(f"popsize must be at least 2 (CMA-ES ranks candidates), got {self.popsize}", "popsize")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise _fail(f"sigma0 must be a positive number, got {self.sigma0}", "sigma0")
        if self.max_generations < 1:
            raise _fail(f"max_generations must be at least 1, got {self.max_generations}", "max_generations")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise _fail(f"max_evaluations must be at least 1, got {self.max_evaluations}", "max_evaluations")
        return self


class SubsetSection(Section):
    """Cheap fitness: score candidates on a few items that separate the parents (docs/evolution.md)."""

    items: int = 20  # per task
    rescore_top: int = 4  # best candidates rescored on the full fitness set before the winner is chosen


class FitnessSection(Section):
    tasks: list[str]
    heldout: list[str] = []
    subset: SubsetSection | None = None

    @model_validator(mode="after")
    def _check(self) -> FitnessSection:
        if not self.tasks:
            raise _fail("expected at least one task file", "tasks")
        return self


class BackendSection(Section):
    name: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = None
    # torch intra-op threads while scoring (hf); None keeps torch's default. On 2 shared cores one
    # thread ran the demo's tiny models 17x faster than two (../shared/notes/evolution-demo.md).
    threads: int | None = None
    # live engines scoring candidates at once, each in its own dask worker process (docs/cluster.md);
    # None: one in this process, or one per worker of a given cluster. Not part of a run's fingerprint.
    scorers: int | None = None

    @model_validator(mode="after")
    def _check(self) -> BackendSection:
        if self.scorers is not None and self.scorers < 1:
            raise _fail(f"scorers must be at least 1, got {self.scorers}", "scorers")
        return self


class EvolveSection(Section):
    """`evolve:` beside a merge or a breed section, which is the template that genes fill."""

    genes: list[GeneSection]
    search: SearchSection = SearchSection()
    fitness: FitnessSection
    backend: BackendSection = BackendSection()

    @model_validator(mode="after")
    def _check(self) -> EvolveSection:
        if not self.genes:
            raise _fail("expected at least one gene", "genes")
        names = [g.name for g in self.genes if g.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _fail(f"gene names must be unique, {dup[0]!r} is used twice", "genes")
        for i, g in enumerate(self.genes):
            if g.tie is not None and g.tie not in names:
                raise _fail(f"tie: no gene is named {g.tie!r}", f"genes[{i}].tie")
            if g.tie is not None and g.tie == g.name:
                raise _fail("a gene cannot be tied to itself", f"genes[{i}].tie")
        return self


class Manifest(Section):
    merge_method: str | None = None
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: DType = None
    out_dtype: DType = None
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: Annotated[str | None, BeforeValidator(_chat_template)] = None
    modules: Any = None
    darwin: DarwinSection = DarwinSection()
    breed: BreedSection | None = None
    evolve: EvolveSection | None = None
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.modules is not None:
            raise _fail("multi-module configs are not supported; use models or slices", "modules")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise _fail("give tokenizer_source or tokenizer, not both", "tokenizer_source")
        if self.breed is not None:
            return self  # breed.plan_breed owns the rest of the section's meaning
        if self.merge_method is None:
            raise _fail("required field missing (a method such as linear, slerp, ties)", "merge_method")
        if (self.models is None) == (self.slices is None):
            raise _fail("give exactly one of models or slices", "models")
        if self.models is not None and not self.models:
            raise _fail("expected at least one model", "models")
        if self.slices is not None and not self.slices:
            raise _fail("expected at least one slice", "slices")
        return self

    @property
    def warnings(self) -> list[str]:
        """Lines about what was accepted and ignored, as mergekit does (the plan's notes repeat them)."""
        return list(self._warnings)

    @property
    def out_code(self) -> str | None:
        """The child's dtype when the manifest fixes it: darwin.out_dtype, out_dtype, then dtype."""
        return self.darwin.out_dtype or self.out_dtype or self.dtype


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def _loc(loc: tuple, sub: str = "") -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    if sub:
        out += sub if sub.startswith("[") or not out else f".{sub}"
    return out or "(top level)"


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "too_short": "[start, end]",
    "too_long": "[start, end]",
}


def _one_line(err: ValidationError) -> ManifestError:
    """The first pydantic error as `manifest: <path>: <expected>, got <input>`."""
    e = err.errors()[0]
    ctx = e.get("ctx") or {}
    path = _loc(e["loc"], ctx.get("sub", ""))
    kind = e["type"]
    if kind == "darwin":
        msg = ctx["msg"]
    elif kind == "missing":
        msg = "required field missing"
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind in _TYPE_WORDS:
        msg = f"expected {_TYPE_WORDS[kind]}, got {show(e.get('input'))}"
    elif kind == "literal_error":
        msg = f"expected {ctx.get('expected')}, got {show(e.get('input'))}"
    else:
        msg = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {show(e.get('input'))}"
    return ManifestError(f"manifest: {path}: {msg}")


def _check_method(m: Manifest) -> list[str]:
    """The method exists, and every parameter name is one it reads (per model or method level),
    or one another method reads, which is ignored with a warning line (returned).

    Parameters are checked here, before any parent is opened, so a typo costs nothing.
    """
    if m.merge_method is None:
        return []
    from darwin_stream import methods

    try:
        method = methods.get(m.merge_method)
    except KeyError:
        raise ManifestError(
            f"manifest: merge_method: unknown method {show(m.merge_method)} (known: {', '.join(methods.names())})"
        ) from None
    per_model = set(method.model_param_defaults)
    either = per_model | set(method.param_defaults)
    anywhere = _all_parameter_names()
    ignored: dict[str, list[str]] = {}

    def check(params: Parameters | None, where: str, allowed: set[str]) -> None:
        for name in params or {}:
            if name in allowed:
                continue
            if name in anywhere:  # another method's parameter: mergekit accepts and ignores it
                ignored.setdefault(name, []).append(f"{where}.{name}")
                continue
            expected = ", ".join(sorted(allowed)) or "none"
            raise ManifestError(
                f"manifest: {where}.{name}: unknown parameter for {method.name} (expected one of: {expected})"
            )

    check(m.parameters, "parameters", either)
    for i, im in enumerate(m.models or []):
        check(im.parameters, f"models[{i}].parameters", per_model)
    for i, sl in enumerate(m.slices or []):
        check(sl.parameters, f"slices[{i}].parameters", either)
        for j, src in enumerate(sl.sources):
            check(src.parameters, f"slices[{i}].sources[{j}].parameters", per_model)
    return [f"{', '.join(places)}: ignored, {method.name} " + (f"reads {name} only for the whole merge or slice, "
            "not per model" if name in either else f"does not read {name}") + " (mergekit ignores it too)"
            for name, places in ignored.items()]


def _all_parameter_names() -> set[str]:
    """Every parameter some method reads: one of these given to a method that does not read it
    (a per-model `weight` under slerp, from a linear config edited to slerp) is what mergekit's
    configs carry and mergekit ignores; any other name is a typo, refused."""
    from darwin_stream import methods

    out: set[str] = set()
    for name in methods.names():
        m = methods.get(name)
        out |= set(m.param_defaults) | set(m.model_param_defaults)
    return out


MAX_MANIFEST_BYTES = 2**20  # the largest shipped manifest is 2 KiB; a 1 MiB one is already absurd
MAX_YAML_DEPTH = 64  # mergekit manifests nest about 8 levels (slices[].sources[].parameters.x[].value)
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000  # after expanding aliases: a 590-byte alias bomb expands to billions


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with the document's depth and alias count bounded while it is composed, and its
    size with every alias expanded bounded before anything is constructed from it.

    The bound is on the composed node graph, not the constructed value: an alias bomb ("billion
    laughs") is a few hundred nodes shared thousands of ways, cheap to compose and to construct,
    and then costs a minute and gigabytes in whatever walks the value (validation, repr()).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise ManifestError(f"manifest: more than {MAX_YAML_ALIASES} YAML aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ManifestError(f"manifest: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded (memoised: shared nodes are
    counted as often as they are referenced, but walked once)."""
    sizes: dict[int, int] = {}
    order: list[yaml.Node] = []
    todo = [root]
    while todo:  # iterative post-order, so that no depth reaches Python's recursion limit
        node = todo.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        todo += _children(node)
    for node in reversed(order):
        sizes[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _load_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_YAML_NODES:
            raise ManifestError(f"manifest: more than {MAX_YAML_NODES} values once YAML aliases are expanded")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_manifest(text: str) -> Manifest:
    """YAML text -> Manifest (a bounded SafeLoader: a manifest never constructs Python objects, and
    its size, depth and aliases are capped before anything walks it)."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest: {len(text)} characters, over the {MAX_MANIFEST_BYTES} limit")
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"manifest: invalid YAML{where}: {clip(str(problem))}") from None
    except RecursionError:  # a bound above should come first; never a traceback regardless
        raise ManifestError(f"manifest: nested more than {MAX_YAML_DEPTH} levels deep") from None
    if not isinstance(data, dict):
        raise ManifestError(f"manifest: expected a mapping of keys (merge_method, models, ...), got {show(data)}")
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        raise _one_line(e) from None
    m._warnings.extend(_check_method(m))
    return m


def load_manifest(path_or_text: str | os.PathLike) -> tuple[Manifest, str]:
    """A manifest file's path (or its YAML text) -> (Manifest, text); the text goes in the plan.

    A string is taken as a path when it has no newline and names a file or ends in .yaml/.yml.
    The file is bounded (`MAX_MANIFEST_BYTES`, checked by stat before reading) and must be UTF-8.
    """
    s = os.fspath(path_or_text)
    is_path = isinstance(path_or_text, os.PathLike) or (
        "\n" not in s and (os.path.isfile(s) or s.endswith((".yaml", ".yml")))
    )
    if not is_path:
        return parse_manifest(s), s
    try:
        size = os.stat(s).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest: {clip(s)} is {size} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
        with open(s, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"manifest: cannot read {clip(s)}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest: {clip(s)} is not UTF-8 text (byte {e.start})") from None
    return parse_manifest(text), text
