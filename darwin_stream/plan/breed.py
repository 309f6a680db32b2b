"""The breed planner: the manifest's `breed:` section -> Plan (cross-architecture transplants).

A child is the father's architecture with some roles (usually the FFN) blended with the mother's
tensors of the same role. The two parents may name their tensors differently and have different layer
counts and FFN widths, so the plan lines them up by canonical role (arch/), maps layers, and
zero-pads the narrower FFN: a zero-padded FFN computes the same function, so padding never changes a
parent's behaviour, only the width at which the two are blended.

See docs/breeding.md for the YAML contract and how `t` maps onto each method.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from darwin_stream import arch, dtypes, methods
from darwin_stream.errors import PlanError
from darwin_stream.manifest import BlendSpec, BreedSection, Gene, Gradient
from darwin_stream.plan.types import Plan, SourceRef, TensorPlan

# Roles whose one dimension is the FFN intermediate size, and which dimension it is.
FFN_DIM: dict[str, int] = {"ffn_gate": 0, "ffn_up": 0, "ffn_down": 1, "ffn_gate_up": 0}


# --- genes and layer maps ----------------------------------------------------------------------


def gene_values(t: Gene, n_layers: int, where: str = "t") -> list[float]:
    """One value per father layer. A bare list must have exactly `n_layers` values: a genome of the
    wrong length is a mistake (wrong father, stale search result) that must not pass silently."""
    if isinstance(t, Gradient):
        g = t.gradient
        if len(g) == 1 or n_layers == 1:
            return [float(g[0])] * n_layers
        out = []
        for i in range(n_layers):  # mergekit's arithmetic, as manifest.interpolate writes it
            x = i / (n_layers - 1) * (len(g) - 1)
            k = int(x)
            k1 = min(len(g) - 1, k + 1)
            out.append(float((1 - (x - k)) * g[k] + (x - k) * g[k1]))
        return out
    if isinstance(t, list):
        if len(t) != n_layers:
            raise PlanError(
                f"{where}: a list gives one value per father layer: the father has {n_layers} layers, the list has {len(t)} values"
                " (write {gradient: [...]} to interpolate a shorter list)"
            )
        return [float(x) for x in t]
    return [float(t)] * n_layers


def linear_layer_map(n_father: int, n_mother: int) -> list[int]:
    """father layer i <- mother layer round(i*(Lm-1)/(Lf-1)), rounding halves up (not to even), so
    the map is the same on every Python and easy to compute by hand."""
    if n_father == 1:
        return [0]
    return [math.floor(i * (n_mother - 1) / (n_father - 1) + 0.5) for i in range(n_father)]


def resolve_layer_map(spec: str | list[int | None], n_father: int, n_mother: int) -> list[int | None]:
    if spec == "linear":
        return list(linear_layer_map(n_father, n_mother))
    if not isinstance(spec, list) or len(spec) != n_father:
        got = len(spec) if isinstance(spec, list) else spec
        raise PlanError(f"breed.layer_map: expected 'linear' or a list of {n_father} mother layers (one per father layer), got {got}")
    for i, j in enumerate(spec):
        if j is not None and not 0 <= j < n_mother:
            raise PlanError(f"breed.layer_map[{i}]: mother layer {j} is out of range (the mother has {n_mother} layers)")
    return list(spec)


# --- parents, indexed by role ------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    layer: int | None
    role: str
    shape: tuple[int, ...]
    dtype: str
    tail: str  # name after the layer prefix (or the whole name): tells apart tensors of one role


def _index(parent) -> list[_Tensor]:
    adapter = arch.adapter_for(parent.config)
    out = []
    for name, info in parent.tensors.items():
        r = arch.classify(name, parent.config)
        m = adapter._layer.fullmatch(name) if r.layer is not None else None
        tail = m.group(m.lastindex or 1) if m else name
        out.append(_Tensor(name, r.layer, r.role, tuple(info.shape), info.dtype, tail))
    return out


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _pick(f: _Tensor, cands: list[_Tensor]) -> _Tensor | None:
    """The mother's tensor for father tensor `f` among those of its role in the mapped layer."""
    if _leaf(f.name) in ("weight", "bias"):
        cands = [c for c in cands if _leaf(c.name) == _leaf(f.name)]
    if len(cands) <= 1:
        return cands[0] if cands else None
    same = [c for c in cands if c.tail == f.tail]
    if len(same) == 1:
        return same[0]
    raise PlanError(f"breed: father tensor {f.name} (role {f.role}) matches several mother tensors: {', '.join(c.name for c in cands)}")


def _text_config(config: dict) -> tuple[dict, bool]:
    tc = config.get("text_config")
    return (tc, True) if isinstance(tc, dict) else (config, False)


def _seed(base: int, name: str) -> int:
    """Per-tensor seed: stable across runs and processes (unlike hash()), distinct per tensor."""
    return int.from_bytes(hashlib.sha256(f"{base}:{name}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# --- methods -----------------------------------------------------------------------------------


def _method(name: str, where: str) -> methods.MergeMethod:
    try:
        return methods.get(name)
    except KeyError:
        raise PlanError(f"{where}.method: unknown method {name!r}; expected one of {', '.join(methods.names())}") from None


def _split_extras(method: str, extras: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A blend's extra keys, routed to per-model or method-level parameters as the method declares."""
    m = _method(method, where)
    mdef, pdef = m.model_param_defaults, m.param_defaults
    model, params = {}, {}
    for k, v in extras.items():
        if k in mdef:
            model[k] = v
        elif k in pdef:
            params[k] = v
        else:
            raise PlanError(f"{where}.{k}: method {method} has no parameter {k!r}; expected some of {sorted({*mdef, *pdef})}")
    model = {**{p.name: p.default for p in m.model_parameters if not p.required}, **model}
    params = {**{p.name: p.default for p in m.parameters if not p.required}, **params}
    return model, params


def breeding_methods() -> list[str]:
    """The methods a breed section may name: those that declare how `t` maps onto their inputs."""
    return [m.name for m in methods.METHODS if m.breed is not None]


def method_inputs(
    method: str, t: float, father: SourceRef, mother: SourceRef, extras: dict[str, Any], where: str
) -> dict[str, Any]:
    """TensorPlan fields for one blended tensor: how `t` (the mother's share) becomes the method's own
    parameters, as the method declares (`MergeMethod.breed`). t = 0 always means the father's tensor,
    t = 1 the mother's (or the full task vector)."""
    model_extra, params = _split_extras(method, extras, where)
    m = methods.get(method)
    if m.breed is None:
        if m.breed_refusal:
            raise PlanError(f"{where}.method: {m.breed_refusal}")
        raise PlanError(f"{where}.method: {method!r} cannot be used in a breed section; use one of {', '.join(breeding_methods())}")
    try:
        got = m.breed.inputs(t, model_extra, params)
    except methods.BreedError as e:
        raise PlanError(f"{where}.t: {e}") from None
    side = {methods.Side.FATHER: father, methods.Side.MOTHER: mother}
    return dict(models=tuple(side[s] for s in got.models), model_params=got.model_params, params=got.params,
                base=side[got.base] if got.base is not None else None)


def _copied_from_father(tp: TensorPlan, father: str) -> bool:
    """A tensor the child takes from the father unchanged (up to padding): not blended."""
    return (methods.get(tp.method).is_identity(tp.params, tp.model_params) and len(tp.sources()) == 1
            and tp.sources()[0].parent == father)


# --- the plan ----------------------------------------------------------------------------------


def _section(manifest: Any) -> BreedSection:
    s = manifest if isinstance(manifest, BreedSection) else getattr(manifest, "breed", None)
    if s is None and isinstance(manifest, dict):
        s = manifest.get("breed", manifest)
    if isinstance(s, dict):
        s = BreedSection.model_validate(s)
    if not isinstance(s, BreedSection):
        raise PlanError("breed: the manifest has no breed section")
    return s


def _options(manifest: Any) -> tuple[dict[str, Any], int, str | None]:
    """(darwin options, seed, out_dtype code) from whatever the manifest object offers."""
    darwin = getattr(manifest, "darwin", None)
    if hasattr(darwin, "model_dump"):
        opts = darwin.model_dump(exclude_none=True, exclude={"storage_options"})  # secrets: never in a plan
    elif isinstance(darwin, dict):
        opts = dict(darwin)
    else:
        opts = {}
    seed = opts.get("seed", getattr(manifest, "seed", 0))
    out = getattr(manifest, "out_code", None) or opts.get("out_dtype") or getattr(manifest, "out_dtype", None)
    return opts, int(seed or 0), dtypes.parse(str(out)) if out else None


def blend_for(role: str, blend: dict[str, BlendSpec]) -> tuple[str, BlendSpec] | None:
    """The blend entry for a role: an entry naming the role itself wins over one naming its group."""
    if role in blend:
        return role, blend[role]
    group = arch.ROLE_GROUPS.get(role)
    if group in blend:
        return group, blend[group]
    return None


def _ffn_width(t: _Tensor) -> int:
    w = t.shape[FFN_DIM[t.role]]
    return w // 2 if t.role == "ffn_gate_up" else w


def plan_breed(manifest: Any, text: str = "") -> Plan:
    """Manifest with a breed section -> plan.Plan (every father tensor, blended or passed through)."""
    from darwin_stream import pool  # the pool opens stores through zarr: only when planning

    sec = _section(manifest)
    if sec.adapters is not None:
        from darwin_stream.arch.adapters import register_adapters

        register_adapters(sec.adapters)
    opts, seed, out_dtype = _options(manifest)
    valid = set(arch.ROLE_GROUPS) | set(arch.ROLE_GROUPS.values())
    for key in sec.blend:
        if key not in valid:
            raise PlanError(f"breed.blend.{key}: not a role or group; expected one of {', '.join(sorted(valid))}")
    for key, spec in sec.blend.items():
        _split_extras(spec.method, spec.extras(), f"breed.blend.{key}")  # unknown methods/params fail early

    father, mother = pool.get_parent(sec.father), pool.get_parent(sec.mother)
    fk, mk = sec.father, sec.mother
    ftensors, mtensors = _index(father), _index(mother)
    nf = 1 + max((t.layer for t in ftensors if t.layer is not None), default=-1)
    nm = 1 + max((t.layer for t in mtensors if t.layer is not None), default=-1)
    if nf == 0 or nm == 0:
        raise PlanError(f"breed: found no text layers in the {'father' if nf == 0 else 'mother'} "
                        f"({sec.father if nf == 0 else sec.mother}); declare an adapter for its architecture")
    lmap = resolve_layer_map(sec.layer_map, nf, nm)
    genes = {key: gene_values(spec.t, nf, f"breed.blend.{key}.t") for key, spec in sec.blend.items()}

    by_layer: dict[tuple[int | None, str], list[_Tensor]] = {}
    mother_roles: set[str] = set()
    for t in mtensors:
        by_layer.setdefault((t.layer, t.role), []).append(t)
        mother_roles.add(t.role)

    notes: list[str] = []
    fcfg, fnested = _text_config(father.config)
    mcfg, _ = _text_config(mother.config)

    # Pair every blended father tensor with its mother tensor.
    pairs: dict[str, tuple[_Tensor, str, float]] = {}  # father name -> (mother tensor, blend key, t)
    missing: dict[str, list[int]] = {}
    for f in ftensors:
        hit = blend_for(f.role, sec.blend)
        if hit is None:
            continue
        key, _spec = hit
        if f.layer is None:
            if not isinstance(_spec.t, float | int):
                raise PlanError(f"breed.blend.{key}.t: {f.name} is outside the layers; give t as a single number")
            j, t = None, float(_spec.t)
        else:
            j, t = lmap[f.layer], genes[key][f.layer]
            if j is None:
                continue
        if f.role not in mother_roles:
            raise PlanError(f"breed.blend.{key}: the mother ({mk}) has no tensor with role {f.role} (father tensor {f.name})")
        m = _pick(f, by_layer.get((j, f.role), []))
        if m is None:
            missing.setdefault(f.role, []).append(f.layer if f.layer is not None else -1)
            continue
        pairs[f.name] = (m, key, t)
    for role, layers in missing.items():
        notes.append(f"{role}: the mother has no {role} tensor in the layers mapped to father layers "
                     f"{sorted(set(layers))} (e.g. linear-attention layers); those keep the father's tensors")

    # FFN widths: the child is as wide as the wider parent in every layer.
    f_ffn = [f for f in ftensors if f.role in FFN_DIM and f.layer is not None]
    base_f = fcfg.get("intermediate_size")
    new_base = base_f
    if any(f.name in pairs for f in f_ffn) and isinstance(base_f, int) and base_f > 0:
        for f in f_ffn:
            if f.name not in pairs:
                continue
            m = pairs[f.name][0]
            wf, wm = _ffn_width(f), _ffn_width(m)
            mult = max(1, wf // base_f) if wf % base_f == 0 else None  # Gemma4 double-wide layers: 2x
            if wm > wf and mult is None:
                raise PlanError(f"breed: cannot widen {f.name} {list(f.shape)}: its FFN width {wf} is not a multiple of intermediate_size {base_f}")
            if wm > wf:
                new_base = max(new_base, -(-wm // mult))

    def child_shape(f: _Tensor) -> tuple[int, ...]:
        if f.role not in FFN_DIM or f.layer is None or new_base == base_f or len(f.shape) <= FFN_DIM[f.role]:
            return f.shape
        if f.role == "ffn_gate_up":
            raise PlanError(f"breed: {f.name} fuses gate and up; a fused FFN cannot be widened by trailing zeros")
        s = list(f.shape)
        s[FFN_DIM[f.role]] = f.shape[FFN_DIM[f.role]] // base_f * new_base
        return tuple(s)

    if new_base != base_f:
        notes.append(f"FFN widened from intermediate_size {base_f} to {new_base}: the father's FFN is zero-padded "
                     "(gate/up rows, down columns), which computes the same function")

    tensors: list[TensorPlan] = []
    for f in ftensors:
        shape = child_shape(f)
        fref = SourceRef(fk, f.name, shape if shape != f.shape else None)
        dtype = out_dtype or f.dtype
        common = dict(name=f.name, shape=shape, dtype=dtype, layer=f.layer, role=f.role, seed=_seed(seed, f.name))
        if f.name not in pairs:
            tensors.append(TensorPlan(method=methods.COPY.name, models=(fref,), **common))
            continue
        m, key, t = pairs[f.name]
        if len(m.shape) != len(shape) or (m.shape != shape and f.role not in FFN_DIM):
            raise PlanError(f"breed: shapes differ: father {f.name} {list(f.shape)} vs mother {m.name} {list(m.shape)}"
                            f" (hidden_size {fcfg.get('hidden_size')} vs {mcfg.get('hidden_size')}); only FFN widths can be reconciled")
        if f.role in FFN_DIM:
            d = FFN_DIM[f.role]
            others_f = [s for i, s in enumerate(shape) if i != d]
            others_m = [s for i, s in enumerate(m.shape) if i != d]
            if len(shape) <= d:  # a 1-D FFN bias of the hidden size (down_proj.bias)
                others_f, others_m = list(shape), list(m.shape)
            if others_f != others_m:
                raise PlanError(f"breed: hidden-size mismatch: father {f.name} {list(f.shape)} vs mother {m.name} {list(m.shape)}"
                                f" (hidden_size {fcfg.get('hidden_size')} vs {mcfg.get('hidden_size')}); a transplant needs equal hidden sizes")
            if f.role == "ffn_gate_up" and m.shape != shape:
                raise PlanError(f"breed: {f.name} {list(f.shape)} fuses gate and up and the mother's {m.name} is {list(m.shape)}; "
                                "a fused FFN cannot be padded by trailing zeros")
            if len(shape) > d and m.shape[d] > shape[d]:
                raise PlanError(f"breed: mother {m.name} {list(m.shape)} is wider than the child's {list(shape)}")
        mref = SourceRef(mk, m.name, shape if m.shape != shape else None)
        spec = sec.blend[key]
        fields = method_inputs(spec.method, t, fref, mref, spec.extras(), f"breed.blend.{key}")
        tensors.append(TensorPlan(method=spec.method, **fields, **common))

    # What the model card must say.
    blended_roles = {tp.role for tp in tensors if not _copied_from_father(tp, fk)}
    if blended_roles & set(FFN_DIM):
        fa = fcfg.get(arch.adapter_for(father.config).activation_key) or fcfg.get("hidden_act") or fcfg.get("hidden_activation")
        ma = mcfg.get(arch.adapter_for(mother.config).activation_key) or mcfg.get("hidden_act") or mcfg.get("hidden_activation")
        if fa and ma and fa != ma:
            notes.append(f"activations differ: the father's FFN uses {fa}, the mother's {ma}; the child runs the "
                         f"mother's FFN weights under the father's {fa}")
        fnorms = sorted({t.role for t in ftensors if t.role in ("ffn_norm", "ffn_post_norm")})
        mnorms = sorted({t.role for t in mtensors if t.role in ("ffn_norm", "ffn_post_norm")})
        if fnorms != mnorms:
            notes.append(f"FFN norm layouts differ: the father has {', '.join(fnorms) or 'none'}, the mother "
                         f"{', '.join(mnorms) or 'none'}; the child keeps the father's norms around the FFN")
    fad, mad = arch.adapter_for(father.config), arch.adapter_for(mother.config)
    if fad.norm_offset != mad.norm_offset and blended_roles & {"attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm", "final_norm"}:
        notes.append(f"norm conventions differ: {fad.name} scales by {'1+w' if fad.norm_offset else 'w'}, {mad.name} by "
                     f"{'1+w' if mad.norm_offset else 'w'}; blended norm weights are on different scales")
    if nf != nm or sec.layer_map != "linear":
        notes.append(f"layer map (father <- mother): {', '.join(f'{i}<-{j}' for i, j in enumerate(lmap))}")

    overrides: dict[str, Any] = {}
    if new_base != base_f:
        overrides = {"text_config": {"intermediate_size": new_base}} if fnested else {"intermediate_size": new_base}
    return Plan(
        parents={fk: sec.father, mk: sec.mother},
        tensors=tensors,
        config_from=fk,
        tokenizer_from=fk,
        config_overrides=overrides,
        out_dtype=out_dtype,
        manifest=text,
        notes=notes,
        options=opts,
    )
