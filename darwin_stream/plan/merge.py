"""The merge planner: a mergekit manifest -> Plan, for every child tensor its inputs, method and parameters.

It follows mergekit's own hierarchy (slices -> layers -> tensors); docs/manifest.md has the semantics.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from darwin_stream.errors import PlanError
from darwin_stream.manifest import evaluate
from darwin_stream.plan.types import Plan, SourceRef, TensorPlan, layer_t, tensor_seed
from darwin_stream.plan.vocab import TokenizerPlan, plan_tokenizer

if TYPE_CHECKING:
    from darwin_stream.manifest import Manifest, Parameters
    from darwin_stream.sources import Parent


# --------------------------------------------------------------------------------------------
# Building a plan from a manifest (mergekit semantics; see docs/manifest.md).
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One input of an output slice: a model and the first of its layers that the slice reads."""

    spec: str
    start: int
    params: Parameters | None
    where: str  # manifest path, for errors


@dataclass
class _Slice:
    """mergekit's OutputSliceDefinition: `length` output layers, each blended from every source."""

    sources: list[_Source]
    base: str | None
    params: Parameters | None
    length: int
    where: str


class _Index:
    """A parent's tensors grouped by layer, classified once (classification is the costly part)."""

    def __init__(self, parent: Parent):
        from darwin_stream import arch

        self.parent = parent
        self.roles = {n: arch.classify(n, parent.config) for n in parent.tensors}
        self.by_layer: dict[int, list[str]] = {}
        self.outside: list[str] = []
        for n, r in self.roles.items():
            if r.layer is None:
                self.outside.append(n)
            else:
                self.by_layer.setdefault(r.layer, []).append(n)
        for names in self.by_layer.values():
            names.sort()  # shard order is an accident of how the parent was saved; names are stable
        self.num_layers = max(self.by_layer) + 1 if self.by_layer else 0


class _Parents:
    """Each parent of a plan, from the parent pool; `given` lets callers (tests) pass open parents."""

    def __init__(self, given: Mapping[str, Parent] | None):
        self._open: dict[str, Parent] = dict(given or {})
        self._index: dict[str, _Index] = {}

    def get(self, spec: str) -> Parent:
        if spec not in self._open:
            from darwin_stream import pool  # the pool opens stores through zarr: only when planning

            self._open[spec] = pool.get_parent(spec)  # SourceError propagates: it already names the parent
        return self._open[spec]

    def index(self, spec: str) -> _Index:
        if spec not in self._index:
            self._index[spec] = _Index(self.get(spec))
        return self._index[spec]


def _canon(spec: str) -> str:
    """Two spellings of one local directory are one model (mergekit compares references too)."""
    return os.path.realpath(spec) if os.path.exists(spec) else spec.rstrip("/")


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and _canon(a) == _canon(b)


def _parent_keys(specs: list[str]) -> dict[str, str]:
    """spec -> short readable key (the directory or repo name), made unique with -2, -3, ..."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for spec in specs:
        if spec in keys:
            continue
        stem = re.sub(r"[^A-Za-z0-9._@-]+", "_", os.path.basename(spec.rstrip("/")) or spec) or "parent"
        key, n = stem, 2
        while key in used:
            key, n = f"{stem}-{n}", n + 1
        keys[spec] = key
        used.add(key)
    return keys


def _renumber(name: str, old: int, new: int) -> str:
    if old == new:
        return name
    out, n = re.subn(rf"(^|\.)layers\.{old}\.", rf"\g<1>layers.{new}.", name, count=1)
    if not n:
        raise PlanError(
            f"tensor {name!r}: cannot renumber layer {old} (its index is not written as layers.<i>.)"
        )
    return out


def _slices(manifest: Manifest, method: Any, ps: _Parents) -> list[_Slice]:
    """`models:` or `slices:` -> output slices, as mergekit's MergePlanner.normalize_config does.

    With `models:`, one slice spans all layers. A base the method needs is appended as an input when
    it is not listed (mergekit does the same); a base a method does not need is not an input.
    """
    if manifest.models is not None:
        srcs = [_Source(im.model, 0, im.parameters, f"models[{i}]") for i, im in enumerate(manifest.models)]
        _no_duplicates([(s.spec, None) for s in srcs], "models")
        base = manifest.base_model
        wants_base = method.uses_base(True) or method.base_is_input
        if wants_base and base and not any(_same(s.spec, base) for s in srcs):
            srcs.append(_Source(base, 0, None, "base_model"))
        counts = [ps.index(s.spec).num_layers for s in srcs]
        for s, n in zip(srcs, counts, strict=True):
            if n != counts[0]:
                raise PlanError(
                    f"{s.where}: {s.spec} has {n} layers but {srcs[0].spec} has {counts[0]}; "
                    "use slices to merge models of different depths"
                )
        return [_Slice(srcs, base, None, counts[0], "models")]

    out = []
    for i, sl in enumerate(manifest.slices or []):
        srcs = []
        for j, src in enumerate(sl.sources):
            where = f"slices[{i}].sources[{j}]"
            a, b = src.layer_range
            n = ps.index(src.model).num_layers
            if b > n:
                raise PlanError(f"{where}.layer_range: [{a}, {b}] is beyond the {n} layers of {src.model}")
            srcs.append(_Source(src.model, a, src.parameters, where))
        _no_duplicates([(s.model, s.layer_range) for s in sl.sources], f"slices[{i}].sources")
        lengths = [r.layer_range[1] - r.layer_range[0] for r in sl.sources]
        if len(set(lengths)) != 1:
            raise PlanError(f"slices[{i}]: every source must span the same number of layers, got {lengths}")
        out.append(
            _Slice(srcs, sl.base_model or manifest.base_model, sl.parameters, lengths[0], f"slices[{i}]")
        )
    return out


def _no_duplicates(inputs: list[tuple[str, Any]], where: str) -> None:
    """A model listed twice would be weighted twice; mergekit refuses such duplicate merge inputs."""
    seen: dict[tuple[str, Any], int] = {}
    for i, (spec, extent) in enumerate(inputs):
        key = (_canon(spec), extent)
        if key in seen:
            raise PlanError(f"{where}[{i}]: {spec} is already {where}[{seen[key]}]; a model may be merged only once")
        seen[key] = i


def _check_slice(sl: _Slice, method: Any) -> None:
    """The slice's inputs against the method's declared arity and base policy."""
    n = len(sl.sources)
    arity = method.arity
    # The method's own words for a wrong count come first, over the inputs it would be handed.
    if arity.message is not None and not arity.admits(n - int(method.uses_base(sl.base is not None))):
        raise PlanError(f"{sl.where}: {method.name} " + arity.message.format(inputs=n))
    if method.uses_base(sl.base is not None):
        if sl.base is None:
            raise PlanError(f"base_model: {method.name} needs a base_model, and none is given")
        if not any(_same(s.spec, sl.base) for s in sl.sources):
            raise PlanError(
                f"{sl.where}: base_model {sl.base} is not among the inputs, and {method.name} needs it"
            )
    k = n - int(method.uses_base(sl.base is not None) and any(_same(s.spec, sl.base) for s in sl.sources))
    if not arity.admits(k):
        raise PlanError(f"{sl.where}: {method.name} takes {arity.describe()} model(s) besides the base, got {k}")


def _tied_embedding(idx: _Index, name: str, role: Any) -> str | None:
    """The tensor that stands for a missing lm_head in a parent that ties it to its embeddings.

    mergekit marks lm_head optional with tied_names [embed_tokens] in every architecture it ties:
    a parent without an lm_head gives its input embedding in its place, as transformers does.
    """
    if role is None or role.role != "lm_head" or any(idx.roles[n].role == "lm_head" for n in idx.outside):
        return None
    embeds = [n for n in idx.outside if idx.roles[n].role == "embed"]
    return embeds[0] if len(embeds) == 1 else None


def _missing_in_template(ps: _Parents, sl: _Slice, tpl: _Source, names: set[str],
                         theirs: Callable[[_Source], dict[str, str]]) -> None:
    """Refuse a tensor some input of the slice has and its template parent lacks.

    The template names the child's tensors, so such a tensor would silently be left out of the
    child, which then loads with freshly initialised weights (found by trying it: exit 0, the
    child one tensor short). `theirs(s)` maps each name of source s, in the template's numbering,
    to its own name there.
    """
    for s in sl.sources:
        for mapped, own in theirs(s).items():
            if mapped not in names:
                raise PlanError(f"tensor {mapped!r} is missing in parent {tpl.spec}, which {s.spec} has"
                                + (f" (as {own!r})" if own != mapped else "")
                                + "; every input of the merge must have it")


def _resolve(
    name: str,
    levels: list[Parameters | None],
    matches: Callable[[str], bool],
    t: float,
) -> Any:
    """First level (model, slice, top level) whose setting yields a value for this tensor.

    A filtered setting with no matching filter yields nothing, so a per-model `weight` that only
    covers `mlp` falls back to the top-level `weight` elsewhere: mergekit's ConfigReader order.
    """
    for params in levels:
        if params and name in params:
            v = evaluate(params[name], matches, t)
            if v is not None:
                return v
    return None


class _Builder:
    def __init__(self, manifest: Manifest, method: Any, ps: _Parents, config_spec: str):
        from darwin_stream import methods

        self.m = manifest
        self.method = method
        self.ps = ps
        self.config_spec = config_spec
        self.required = methods.REQUIRED
        self.copy = methods.COPY  # how a tensor that is not blended (an integer buffer) is planned
        self.keys: dict[str, str] = {}
        self.tensors: list[TensorPlan] = []
        self.tok: TokenizerPlan | None = None  # the child's own vocabulary, when the manifest asks for one

    def key(self, spec: str) -> str:
        return self.keys[spec]

    def params(
        self,
        defaults: Mapping[str, Any],
        levels: list[Parameters | None],
        name: str,
        role: Any,
        t: float,
        who: str,
    ) -> dict[str, Any]:
        from darwin_stream import arch

        def matches(f: str) -> bool:
            return arch.matches_filter(name, role, f)

        out = {}
        for p, default in defaults.items():
            v = _resolve(p, levels, matches, t)
            if v is None:
                if default is self.required:
                    raise PlanError(f"{who}.parameters.{p}: {self.method.name} needs {p} for tensor {name}")
                v = default
            out[p] = v
        return out

    def tensor(
        self, sl: _Slice, tpl: _Source, tpl_name: str, child: str, t: float, layer: int | None
    ) -> None:
        """One child tensor: its inputs in every source, checked, and its resolved parameters."""
        tpl_idx = self.ps.index(tpl.spec)
        role = tpl_idx.roles.get(tpl_name)
        src_layer = role.layer if role is not None else None
        vocab = self.tok is not None and self.tok.reindexes(role.role if role is not None else None)
        names: list[str] = []
        for s in sl.sources:
            nm = (
                tpl_name
                if src_layer is None
                else _renumber(tpl_name, src_layer, s.start + (src_layer - tpl.start))
            )
            if nm not in self.ps.get(s.spec).tensors:
                nm = _tied_embedding(self.ps.index(s.spec), nm, role) or nm
            if nm not in self.ps.get(s.spec).tensors:
                raise PlanError(f"tensor {nm!r} is missing in parent {s.spec}")
            names.append(nm)
        ref_info = self.ps.get(tpl.spec).tensors[tpl_name]
        for s, nm in zip(sl.sources, names, strict=True):
            info = self.ps.get(s.spec).tensors[nm]
            if tuple(info.shape)[vocab:] != tuple(ref_info.shape)[vocab:]:  # a vocabulary's rows may differ
                raise PlanError(
                    f"tensor {child!r}: shape {list(ref_info.shape)} in {tpl.spec} "
                    f"but {list(info.shape)} in {s.spec}" + ("" if nm == tpl_name else f" ({nm})")
                )
        seed = tensor_seed(self.m.darwin.seed, child)
        shape = tuple(ref_info.shape)
        if vocab:
            assert self.tok is not None and self.tok.vocab is not None
            shape = (self.tok.rows, *shape[1:])
        role_name = role.role if role is not None else None

        from darwin_stream import dtypes

        if ref_info.dtype not in dtypes.FLOAT_CODES:
            # Integer buffers are not blended: they come from the template parent unchanged.
            mp = {p.name: (None if p.required else p.default) for p in self.copy.model_parameters}
            self.tensors.append(
                TensorPlan(
                    child,
                    shape,
                    ref_info.dtype,
                    self.copy.name,
                    (SourceRef(self.key(tpl.spec), tpl_name),),
                    (mp,),
                    {},
                    None,
                    layer,
                    role_name,
                    seed,
                )
            )
            return

        base: SourceRef | None = None
        models: list[tuple[_Source, str]] = []
        for s, nm in zip(sl.sources, names, strict=True):
            if self.method.uses_base(sl.base is not None) and base is None and _same(s.spec, sl.base):
                base = SourceRef(self.key(s.spec), nm)
            else:
                models.append((s, nm))
        top = self.m.parameters
        params = self.params(
            self.method.param_defaults,
            [sl.params, top],
            child,
            role,
            t,
            "parameters" if sl.where == "models" else sl.where,
        )
        model_params = []
        for s, nm in models:
            r = self.ps.index(s.spec).roles.get(nm, role)
            model_params.append(
                self.params(self.method.model_param_defaults, [s.params, sl.params, top], nm, r, t, s.where)
            )
        problem = self.method.check(params, model_params, math.prod(shape)) if self.method.check else None
        if problem:
            raise PlanError(f"tensor {child!r}: {problem}")
        tp = TensorPlan(
            name=child,
            shape=shape,
            dtype=self.m.out_code or ref_info.dtype,
            method=self.method.name,
            models=tuple(SourceRef(self.key(s.spec), nm) for s, nm in models),
            model_params=tuple(model_params),
            params=params,
            base=base,
            layer=layer,
            role=role_name,
            seed=seed,
        )
        if vocab:
            assert self.tok is not None
            order = [(self.key(s.spec), nm, self.ps.get(s.spec).tensors[nm].shape[0])
                     for s, nm in zip(sl.sources, names, strict=True)]
            tp = self.tok.gathered(tp, order, self.key(sl.base) if sl.base else None)
        self.tensors.append(tp)

    def template(self, sl: _Slice) -> _Source:
        """The source whose tensor names the child takes: the config parent when it is an input."""
        for s in sl.sources:
            if _same(s.spec, self.config_spec):
                return s
        return sl.sources[0]


# Config lists that hold layer *indices* rather than one value per layer (Qwen3-MoE's dense layers).
INDEX_LISTS = ("mlp_only_layers",)
# Where a multimodal config keeps its language model's geometry.
TEXT_SECTIONS = ("text_config", "language_config", "llm_config")


def stacked_config(config: dict, layers: list[tuple[dict, int]]) -> dict[str, Any]:
    """Config overrides that keep a stacked child (slices) consistent with its layers.

    `layers[j]` is child layer j's (template parent's config, layer index there). Every list with one
    entry per layer (layer_types, and any other list as long as num_hidden_layers: Gemma-3n's
    per-layer intermediate_size, SmolLM3's no_rope_layers) is rebuilt from the stacked layers, and
    index lists are renumbered. Transformers 5 refuses a config whose layer_types disagrees with
    num_hidden_layers; mergekit 0.1.5 copies layer_types unchanged, so its stacked child does not load.
    """
    out: dict[str, Any] = {}
    nested = [k for k in TEXT_SECTIONS if isinstance(config.get(k), dict) and "num_hidden_layers" in config[k]]
    for key in nested:
        out[key] = _stacked_section(config[key], [(c.get(key) or {}, i) for c, i in layers])
    if "num_hidden_layers" in config or not nested:
        out.update(_stacked_section(config, layers))
    return out


def _stacked_section(config: dict, layers: list[tuple[dict, int]]) -> dict[str, Any]:
    n = config.get("num_hidden_layers")
    out: dict[str, Any] = {"num_hidden_layers": len(layers)}
    for key, v in config.items():
        if not isinstance(v, list):
            continue
        if key in INDEX_LISTS:
            out[key] = [j for j, (c, i) in enumerate(layers) if i in (c.get(key) or [])]
        elif len(v) == n:
            srcs = [c.get(key) for c, _ in layers]
            if all(isinstance(src, list) and i < len(src) for src, (_, i) in zip(srcs, layers, strict=True)):
                out[key] = [src[i] for src, (_, i) in zip(srcs, layers, strict=True)]
    return out


def plan_merge(manifest: Manifest, text: str = "", *, parents: Mapping[str, Parent] | None = None) -> Plan:
    """Resolve a manifest against its parents into a Plan: every child tensor, its inputs and params.

    Follows mergekit's MergePlanner: embeddings come from the first slice's inputs at t = 0, each
    slice's layers are numbered on in order with t = i / (length - 1), and the final norm and
    lm_head come from the last slice's inputs at t = 0. Raises PlanError (one line) when a tensor is
    missing or shapes differ; a missing parent raises the SourceError that sources/ gives.
    """
    from darwin_stream import methods

    try:
        method = methods.get(manifest.merge_method or "")
    except KeyError:
        raise PlanError(
            f"merge_method: unknown method {manifest.merge_method!r} (known: {', '.join(methods.names())})"
        ) from None
    ps = _Parents(parents)
    slices = _slices(manifest, method, ps)
    for sl in slices:
        _check_slice(sl, method)

    config_spec = manifest.base_model or slices[0].sources[0].spec
    ps.get(config_spec).require_config()
    specs = [config_spec] + [s.spec for sl in slices for s in sl.sources]
    b = _Builder(manifest, method, ps, config_spec)
    # Specs spelled differently for one directory share a key, so the plan names each parent once.
    canon_first: dict[str, str] = {}
    for spec in specs:
        canon_first.setdefault(_canon(spec), spec)
    keys = _parent_keys(list(canon_first.values()))
    b.keys = {spec: keys[canon_first[_canon(spec)]] for spec in specs}

    def key_of(spec: str) -> str | None:
        first = canon_first.get(_canon(spec))
        return None if first is None else keys[first]

    b.tok = plan_tokenizer(manifest, ps.get, key_of, {keys[s]: s for s in canon_first.values()}, b.key(config_spec))

    cfg_idx = ps.index(config_spec)
    pre = [n for n in cfg_idx.outside if cfg_idx.roles[n].group == "embed"]
    post = [n for n in cfg_idx.outside if cfg_idx.roles[n].group != "embed"]

    def outside(sl: _Slice, names: list[str], embed: bool) -> None:
        tpl = b.template(sl)
        for n in names:
            if n not in ps.get(tpl.spec).tensors:
                raise PlanError(f"tensor {n!r} is missing in parent {tpl.spec}")
            b.tensor(sl, tpl, n, n, 0.0, None)

        def theirs(s: _Source) -> dict[str, str]:
            idx = ps.index(s.spec)
            own = [n for n in idx.outside if (idx.roles[n].group == "embed") == embed]
            if not any(cfg_idx.roles[n].role == "lm_head" for n in cfg_idx.outside):
                for n in [n for n in own if idx.roles[n].role == "lm_head"]:  # the child ties it: optional
                    notes.append(f"{n} of {s.spec} is not used: the child ties its lm_head to its embeddings, "
                                 f"as its config parent {config_spec} does")
                    own.remove(n)
            return {n: n for n in own}

        _missing_in_template(ps, sl, tpl, set(names), theirs)

    notes = list(manifest.warnings)
    outside(slices[0], pre, True)
    out_layer = 0
    stacked: list[tuple[dict, int]] = []  # per child layer: its template parent's config, its layer there
    for sl in slices:
        tpl = b.template(sl)
        tpl_idx = ps.index(tpl.spec)
        for i in range(sl.length):
            src_layer = tpl.start + i
            tpl_names = tpl_idx.by_layer.get(src_layer, [])
            for n in tpl_names:
                b.tensor(sl, tpl, n, _renumber(n, src_layer, out_layer), layer_t(i, sl.length), out_layer)
            _missing_in_template(ps, sl, tpl, set(tpl_names), lambda s, i=i, src_layer=src_layer: {
                _renumber(n, s.start + i, src_layer): n for n in ps.index(s.spec).by_layer.get(s.start + i, [])})
            stacked.append((tpl_idx.parent.config, src_layer))
            out_layer += 1
    outside(slices[-1], post, False)

    overrides: dict[str, Any] = stacked_config(cfg_idx.parent.config, stacked) if manifest.slices is not None else {}

    if b.tok is not None:
        overrides.update(b.tok.overrides)
    if manifest.dtype and manifest.dtype != "F32":
        notes.append(
            f"dtype {manifest.dtype}: mergekit computes in this dtype; darwin-stream computes in float32 "
            "and rounds once to the child's dtype"
        )
    d = manifest.darwin
    return Plan(
        parents={k: spec for spec, k in sorted(keys.items(), key=lambda kv: specs.index(kv[0]))},
        tensors=b.tensors,
        config_from=b.key(config_spec),
        tokenizer_from=b.key(config_spec),
        config_overrides=overrides,
        out_dtype=manifest.out_code,
        manifest=text,
        notes=notes,
        tokenizer=b.tok.spec if b.tok is not None else {},
        options={
            "memory_budget": d.memory_budget,
            "shard_size": d.shard_size,
            "seed": d.seed,
            "device": d.device,
            "format": d.format,
            "direct_io": d.direct_io,
            "allow_nonfinite": d.allow_nonfinite,
            "dtype": manifest.dtype,
        },
    )


