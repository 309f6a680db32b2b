"""A genome fills a template plan: genes become per-tensor parameters with no manifest round trip.

mergekit-evolve maps a genome back onto a YAML config, which is then validated, opened and planned
again for every candidate. Here the manifest is planned once; `Template.apply(x)` only replaces the
parameters of the tensors a gene touches (on the 0.6B geometry, 311 tensors: well under a
millisecond), so the candidate's plan is the one `darwin-stream merge` would build from the resolved
manifest (`Template.resolved_manifest`), value for value: per-layer values are expanded through the
same gradient arithmetic (`manifest.interpolate` at `plan.layer_t`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from darwin_stream import arch, methods
from darwin_stream.errors import EvolveError
from darwin_stream.manifest import EvolveSection, GeneSection, Manifest, interpolate
from darwin_stream.plan.breed import blend_for, method_inputs
from darwin_stream.plan.types import Plan, TensorPlan, layer_t


@dataclass(frozen=True)
class Gene:
    """One searched gene, expanded: `values` coordinates of the genome, from `offset` on."""

    index: int  # position in evolve.genes
    name: str
    param: str
    model: str | None  # plan parent key of the model a per-model parameter belongs to
    filters: tuple[str, ...]
    granularity: str
    groups: tuple[str, ...]  # one label per value group (a filter name, or "all")
    per_group: int  # values per group: 1, n_layers, or ceil(n_layers / block)
    block: int
    bounds: tuple[float, float]
    offset: int  # first coordinate in the search vector (tied genes take none of their own)
    tie: int | None  # index of the gene this one copies
    negate: bool

    @property
    def size(self) -> int:
        return len(self.groups) * self.per_group

    def value(self, x: Sequence[float], genes: Sequence[Gene], group: int, k: int) -> float:
        if self.tie is not None:
            v = genes[self.tie].value(x, genes, min(group, len(genes[self.tie].groups) - 1), k)
            return -v if self.negate else v
        return float(x[self.offset + group * self.per_group + k])

    def layer_values(self, x: Sequence[float], genes: Sequence[Gene], group: int, n_layers: int) -> list[float]:
        """One value per layer for a group: a block value repeated over its k layers."""
        if self.granularity in ("global", "role"):
            return [self.value(x, genes, group, 0)]
        step = self.block if self.granularity == "block" else 1
        return [self.value(x, genes, group, i // step) for i in range(n_layers)]


@dataclass(frozen=True)
class Slot:
    """Where one gene writes into one tensor's plan."""

    tensor: int  # index into plan.tensors
    gene: int
    group: int
    where: str  # "model" (model_params[model_index]), "params", or "breed_t"
    model_index: int = -1


def _matches(tp: TensorPlan, f: str) -> bool:
    """mergekit's filter rule (arch.matches_filter): a substring of the name, or the role or its group."""
    return f in tp.name or (tp.role is not None and f in (tp.role, arch.ROLE_GROUPS.get(tp.role)))


def _n_layers(plan: Plan) -> int:
    return 1 + max((t.layer for t in plan.tensors if t.layer is not None), default=-1)


class _PlainDumper(yaml.SafeDumper):
    """No anchors or aliases in the resolved manifest: manifests are loaded with aliases refused."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class Template:
    """A plan whose searched parameters are knobs. Build it once per run; apply a genome per candidate."""

    def __init__(self, plan: Plan, manifest: Manifest):
        if manifest.evolve is None:
            raise EvolveError("manifest: evolve: the manifest has no evolve section")
        if manifest.slices is not None:
            raise EvolveError("manifest: evolve: genes over slices are not supported; use models: or breed:")
        self.plan = plan
        self.manifest = manifest
        self.section: EvolveSection = manifest.evolve
        self.breed = manifest.breed is not None
        self.n_layers = _n_layers(plan)
        self.genes = self._expand(self.section.genes)
        self.dim = sum(g.size for g in self.genes if g.tie is None)
        self.slots = self._slots()
        self.lower = [0.0] * self.dim
        self.upper = [0.0] * self.dim
        for g in self.genes:
            if g.tie is None:
                for j in range(g.size):
                    self.lower[g.offset + j], self.upper[g.offset + j] = g.bounds

    # --- building ---------------------------------------------------------------------------

    def _model_key(self, spec: GeneSection, where: str) -> str | None:
        if spec.model is None:
            return None
        for key, parent in self.plan.parents.items():
            if spec.model in (key, parent):
                return key
        raise EvolveError(f"manifest: {where}.model: {spec.model!r} is not a model of the template "
                          f"(models: {', '.join(self.plan.parents.values())})")

    def _expand(self, specs: list[GeneSection]) -> list[Gene]:
        names = [s.name or f"gene{i}" for i, s in enumerate(specs)]
        out: list[Gene] = []
        offset = 0
        for i, s in enumerate(specs):
            where = f"evolve.genes[{i}]"
            groups = s.filters if s.granularity == "role" else ("all",)
            if s.granularity in ("global", "role"):
                per = 1
            elif s.granularity == "layer":
                per = self.n_layers
            else:
                per = -(-self.n_layers // (s.block or 1))
            tie = names.index(s.tie) if s.tie is not None else None
            if tie is not None and tie > i:
                raise EvolveError(f"manifest: {where}.tie: a gene can only be tied to one listed before it")
            gene = Gene(index=i, name=names[i], param=s.param, model=self._model_key(s, where),
                        filters=s.filters, granularity=s.granularity, groups=tuple(groups), per_group=per,
                        block=s.block or 1, bounds=(float(s.bounds[0]), float(s.bounds[1])),
                        offset=offset if tie is None else -1, tie=tie, negate=s.negate)
            if tie is not None and (out[tie].per_group != per):
                raise EvolveError(f"manifest: {where}.tie: {names[i]} and {s.tie} have different granularities")
            if self.breed and s.param != "t":
                raise EvolveError(f"manifest: {where}.param: a breed gene sets a blend's t, got {s.param!r}")
            if self.breed and self.manifest.breed is not None:
                unknown = [f for f in s.filters if f not in self.manifest.breed.blend]
                if unknown:
                    raise EvolveError(f"manifest: {where}.filter: {unknown[0]!r} is not a blend entry of the breed "
                                      f"section (entries: {', '.join(self.manifest.breed.blend)})")
            if tie is None:
                offset += gene.size
            out.append(gene)
        return out

    def _slots(self) -> list[Slot]:
        """For every tensor, the first gene per parameter whose filter selects it (mergekit's order)."""
        slots: list[Slot] = []
        hits = [0] * len(self.genes)
        for ti, tp in enumerate(self.plan.tensors):
            taken: set[tuple[str, int]] = set()
            for g in self.genes:
                for where, mi in self._targets(tp, g):
                    group = self._group(tp, g)
                    if group is None or (where, mi) in taken:
                        continue
                    taken.add((where, mi))
                    slots.append(Slot(ti, g.index, group, where, mi))
                    hits[g.index] += 1
        for g, n in zip(self.genes, hits, strict=True):
            if n == 0:
                what = f"{g.param} of model {self.plan.parents[g.model]}" if g.model else g.param
                flt = f" under filter {list(g.filters)}" if g.filters else ""
                raise EvolveError(f"manifest: evolve.genes[{g.index}]: {what}{flt} names no parameter of the template")
        return slots

    def _targets(self, tp: TensorPlan, g: Gene) -> list[tuple[str, int]]:
        if self.breed:
            breed = methods.get(tp.method).breed
            if breed is None or not breed.searchable or self._blend_key(tp) is None:
                return []
            return [("breed_t", -1)]
        if g.model is not None:
            return [("model", i) for i, r in enumerate(tp.models)
                    if r.parent == g.model and i < len(tp.model_params) and g.param in tp.model_params[i]]
        if g.param in tp.params:
            return [("params", -1)]
        return [("model", i) for i, mp in enumerate(tp.model_params) if g.param in mp]

    def _blend_key(self, tp: TensorPlan) -> str | None:
        if tp.role is None or self.manifest.breed is None:
            return None
        hit = blend_for(tp.role, self.manifest.breed.blend)
        return hit[0] if hit else None

    def _group(self, tp: TensorPlan, g: Gene) -> int | None:
        if self.breed:
            # A breed gene's filters name blend entries, so the resolved manifest can write it back.
            key = self._blend_key(tp)
            if g.granularity == "role":
                return g.groups.index(key) if key in g.groups else None
            return 0 if not g.filters or key in g.filters else None
        if g.granularity == "role":
            return next((i for i, f in enumerate(g.groups) if _matches(tp, f)), None)
        if g.filters and not any(_matches(tp, f) for f in g.filters):
            return None
        return 0

    # --- applying ---------------------------------------------------------------------------

    def initial(self) -> list[float]:
        """The search's start: each gene's `init`, else the template's own value where it first applies."""
        x = [0.0] * self.dim
        for g, spec in zip(self.genes, self.section.genes, strict=True):
            if g.tie is not None:
                continue
            if spec.init is not None:
                vals = spec.init if isinstance(spec.init, list) else [spec.init] * g.size
                if len(vals) != g.size:
                    raise EvolveError(f"manifest: evolve.genes[{g.index}].init: expected {g.size} values, got {len(vals)}")
                x[g.offset : g.offset + g.size] = [float(v) for v in vals]
                continue
            for group in range(len(g.groups)):
                for k in range(g.per_group):
                    v = self._template_value(g, group, k)
                    lo, hi = g.bounds
                    if not lo <= v <= hi:
                        raise EvolveError(
                            f"manifest: evolve.genes[{g.index}]: the template's {g.param} = {v} lies outside "
                            f"bounds [{lo}, {hi}]; give init: or widen the bounds")
                    x[g.offset + group * g.per_group + k] = v
        return x

    def _template_value(self, g: Gene, group: int, k: int) -> float:
        step = g.block if g.granularity == "block" else 1
        for s in self.slots:
            if s.gene != g.index or s.group != group:
                continue
            tp = self.plan.tensors[s.tensor]
            if g.granularity in ("layer", "block") and (tp.layer is None or tp.layer // step != k):
                continue
            return self._read(tp, s)
        return sum(g.bounds) / 2

    def _read(self, tp: TensorPlan, s: Slot) -> float:
        if s.where == "model":
            return float(tp.model_params[s.model_index][self.genes[s.gene].param])
        if s.where == "params":
            return float(tp.params[self.genes[s.gene].param])
        # breed t: the mother's share, read back through the method's own mapping
        breed = methods.get(tp.method).breed
        assert breed is not None  # a slot is only taken where the method declares one (_targets)
        return breed.read(tp.model_params, tp.params)

    def check(self, x: Sequence[float]) -> None:
        if len(x) != self.dim:
            raise EvolveError(f"genome has {len(x)} values, the template expects {self.dim}")
        for i, v in enumerate(x):
            if not math.isfinite(v):
                raise EvolveError(f"genome value {i} is not finite ({v})")

    def gene_value(self, x: Sequence[float], g: Gene, group: int, layer: int | None) -> float:
        """A gene's value for one tensor, as the resolved manifest's gradient gives it."""
        vals = g.layer_values(x, self.genes, group, self.n_layers)
        if len(vals) == 1:
            return vals[0]
        if self.breed:
            return vals[layer if layer is not None else 0]
        t = layer_t(layer, self.n_layers) if layer is not None else 0.0
        return float(interpolate(tuple(vals), t))

    def apply(self, x: Sequence[float]) -> Plan:
        """The candidate's plan: the template with every slot set from the genome."""
        self.check(x)
        tensors = list(self.plan.tensors)
        for s in self.slots:
            tp = tensors[s.tensor]
            v = self.gene_value(x, self.genes[s.gene], s.group, tp.layer)
            tensors[s.tensor] = self._write(tp, s, v)
        return dataclasses.replace(self.plan, tensors=tensors)

    def _write(self, tp: TensorPlan, s: Slot, v: float) -> TensorPlan:
        param = self.genes[s.gene].param
        if s.where == "model":
            mps = list(tp.model_params)
            mps[s.model_index] = {**mps[s.model_index], param: v}
            return dataclasses.replace(tp, model_params=tuple(mps))
        if s.where == "params":
            return dataclasses.replace(tp, params={**tp.params, param: v})
        father = tp.base if tp.base is not None else tp.models[0]
        mother = tp.models[-1]
        key = self._blend_key(tp) or ""
        spec = self.manifest.breed.blend[key] if self.manifest.breed else None
        fields = method_inputs(tp.method, v, father, mother, spec.extras() if spec else {}, f"breed.blend.{key}")
        return dataclasses.replace(tp, **fields)

    # --- describing ---------------------------------------------------------------------------

    def layout(self) -> list[dict[str, Any]]:
        """One row per gene: name, parameter, model, granularity, groups, coordinates."""
        rows = []
        for g in self.genes:
            rows.append({
                "gene": g.name, "param": g.param,
                "model": self.plan.parents[g.model] if g.model else None,
                "filter": list(g.filters), "granularity": g.granularity,
                "groups": list(g.groups), "values": g.size if g.tie is None else 0,
                "coordinates": [g.offset, g.offset + g.size] if g.tie is None else None,
                "tie": self.genes[g.tie].name if g.tie is not None else None,
                "bounds": list(g.bounds),
            })
        return rows

    def format_layout(self) -> str:
        lines = [f"genome: {self.dim} values, {len(self.genes)} genes, {self.n_layers} layers"]
        for r in self.layout():
            model = f" of {r['model']}" if r["model"] else ""
            flt = f" [{', '.join(r['filter'])}]" if r["filter"] else ""
            span = (f"x[{r['coordinates'][0]}:{r['coordinates'][1]}]" if r["coordinates"]
                    else f"tied to {r['tie']}")
            lines.append(f"  {r['gene']}: {r['param']}{model}{flt}, {r['granularity']}, {r['values']} values "
                         f"{span}, bounds {r['bounds']}")
        return "\n".join(lines)

    def table(self, x: Sequence[float]) -> tuple[list[str], list[list[float | None]]]:
        """A layers x (gene, group) table of values, for genome.png: rows are layers, then 'other'."""
        cols, data = [], []
        for g in self.genes:
            for gi, grp in enumerate(g.groups):
                label = g.name + ("" if grp == "all" else f":{grp}")
                cols.append(label)
                vals = g.layer_values(x, self.genes, gi, self.n_layers)
                data.append(vals * self.n_layers if len(vals) == 1 else vals)
        rows = [[col[i] for col in data] for i in range(self.n_layers)]
        return cols, rows

    # --- the resolved manifest ----------------------------------------------------------------

    def resolved_manifest(self, x: Sequence[float], text: str) -> str:
        """The template's YAML with every gene written in as a plain value or per-layer gradient.

        `darwin-stream merge` on it builds exactly `apply(x)` (tested), and mergekit reads it too
        where the method is mergekit's: genes become filtered values placed before the parameter's
        own setting, in gene order, which is the order in which the template's slots were taken.
        """
        data = yaml.safe_load(text)
        data.pop("evolve", None)
        if self.breed:
            self._write_breed(data, x)
        else:
            self._write_merge(data, x)
        head = "# Resolved by darwin-stream evolve: the genes written in as values; merge this to rebuild the child.\n"
        return head + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=100)

    def _setting(self, x: Sequence[float], g: Gene, group: int) -> float | list[float]:
        vals = g.layer_values(x, self.genes, group, self.n_layers)
        return vals[0] if len(vals) == 1 else vals

    def _conditionals(self, x: Sequence[float], g: Gene) -> list[dict[str, Any]]:
        if g.granularity == "role":
            return [{"filter": f, "value": self._setting(x, g, i)} for i, f in enumerate(g.groups)]
        value = self._setting(x, g, 0)
        if g.filters:
            return [{"filter": f, "value": value} for f in g.filters]
        return [{"value": value}]

    def _write_merge(self, data: dict, x: Sequence[float]) -> None:
        models = data.get("models") or []
        specs = [m.get("model") for m in models]
        per_level: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for g in self.genes:
            method_level = any(s.gene == g.index and s.where == "params" for s in self.slots)
            if method_level:
                targets = [-1]
            else:
                targets = [i for i, spec in enumerate(specs)
                           if g.model is None or spec in (g.model, self.plan.parents[g.model])]
            for i in targets:
                per_level.setdefault((g.param, i), []).extend(self._conditionals(x, g))
        for (param, i), conds in per_level.items():
            holder = data.setdefault("parameters", {}) if i < 0 else models[i].setdefault("parameters", {})
            if holder is None:
                holder = {}
                (data if i < 0 else models[i])["parameters"] = holder
            old = holder.get(param)
            if any("filter" not in c for c in conds):
                old = None  # a gene without a filter covers every tensor: the old setting is never reached
            if isinstance(old, list) and old and all(isinstance(e, dict) for e in old):
                conds = conds + old
            elif isinstance(old, dict):
                conds = [*conds, old]
            elif old is not None:
                conds = [*conds, {"value": old}]
            holder[param] = conds

    def _write_breed(self, data: dict, x: Sequence[float]) -> None:
        blend = data["breed"]["blend"]
        done: set[str] = set()
        for g in self.genes:
            keys = list(g.groups) if g.granularity == "role" else list(g.filters or blend)
            for key in keys:
                if key in done or key not in blend:
                    continue
                done.add(key)
                group = g.groups.index(key) if g.granularity == "role" else 0
                blend[key]["t"] = self._setting(x, g, group)
