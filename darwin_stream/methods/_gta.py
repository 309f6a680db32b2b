"""Generalized task arithmetic (mergekit's GTA family) over row chunks.

task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs and breadcrumbs_ties differ only in how each
task vector (model - base) is sparsified and whether a sign consensus picks which deltas are summed:

    delta_i   = sparsify_i(model_i - base)          (optionally L1-rescaled to the unsparsified norm)
    mixed     = sum_i w_i * delta_i * mask_i        (mask_i: sign of w_i*delta_i agrees with the sign of
                                                     sum_j w_j*delta_j; all ones without consensus)
    divisor   = sum_i w_i * mask_i   (elementwise; 0 -> 1)   or   sum_i w_i   (|.| < 1e-8 -> 1)
    out       = base + lambda * (mixed / divisor if normalize else mixed)

Sparsification needs tensor-wide numbers (magnitude thresholds, L1 norms), gathered by a Statistic so
blend stays elementwise and never holds more than a few chunk-sized temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from darwin_stream.methods import REQUIRED, Chunk, MergeMethod, Statistic
from darwin_stream.methods._sparsify import (
    NOTHING,
    RadixSelect,
    hi_histogram,
    keep_mask,
    lo_histogram,
    magnitude_keys,
    sum_tree,
    total_at_or_above,
)

RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this
MAGNITUDE = "magnitude"
RANDOM = "random"
OUTLIERS = "magnitude_outliers"


def _deltas(chunk: Chunk, i: int) -> torch.Tensor:
    if chunk.base is None:
        raise ValueError("task-arithmetic methods need a base model")
    return chunk.models[i] - chunk.base


def _scale(before: float, after: float) -> float:
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0


# --- magnitude / magnitude_outliers: exact thresholds by radix select (2 passes) ---


def _magnitude_targets(method: str, mp: dict[str, Any], n: int) -> list[int] | str | None:
    """Ranks (1-based, largest first) whose magnitudes bound the kept set, per mergekit's arithmetic."""
    density = float(mp.get("density", 1.0))
    if density >= 1:
        return None
    if method == MAGNITUDE:
        k = int(density * n)
        if k <= 0:
            raise ValueError(f"ties: density {density} keeps no element of a tensor with {n} elements")
        return [k]
    target_n = int(density * n)
    n_top = int(float(mp.get("gamma", 0.01)) * n)
    n_bot = n - target_n - n_top
    if n_bot < 0:
        n_top += n_bot
    if n_top == 0:
        # mergekit keeps sorted[n_bot:-n_top], which is empty when n_top == 0: the delta vanishes.
        return "none"
    return [n_top, n_top + target_n]


def _magnitude_partial(chunk: Chunk, state: Any, kind: str, rescale_default: bool) -> Any:
    rescale = bool(chunk.params.get("rescale", rescale_default))
    out = []
    for i, mp in enumerate(chunk.model_params):
        if float(mp.get("density", 1.0)) >= 1:
            out.append(None)
            continue
        keys = magnitude_keys(_deltas(chunk, i))
        if state is None:
            counts, sums = hi_histogram(keys, rescale)
            out.append({"counts": counts, "sums": sums, "mp": dict(mp)})
        else:
            located = state["models"][i]["located"] if state["models"][i] else []
            out.append({b: lo_histogram(keys, b) for b in RadixSelect.bins(located)})
    return {"rescale": rescale, "models": out}


def _magnitude_finish(combined: Any, state: Any, kind: str) -> Any:
    if state is None:
        models = []
        for m in combined["models"]:
            if m is None:
                models.append(None)
                continue
            n = int(m["counts"].sum())
            targets = _magnitude_targets(kind, m["mp"], n)
            if targets is None or targets == "none":
                models.append({"targets": targets, "located": []})
            else:
                located = RadixSelect.first(m["counts"], targets)
                models.append({"targets": targets, "located": located, "sums": m["sums"]})
        return {"rescale": combined["rescale"], "models": models}
    specs = []
    for m, lo in zip(state["models"], combined["models"], strict=True):
        if m is None or m["targets"] is None:
            specs.append(None)
            continue
        if m["targets"] == "none":
            specs.append({"lo": NOTHING, "hi": None, "scale": 1.0})
            continue
        keys = RadixSelect.second(m["located"], lo)
        lo_key, hi_key = (keys[0], None) if len(keys) == 1 else (keys[1], keys[0])
        scale = 1.0
        if state["rescale"]:
            sums = m["sums"]

            def at_or_above(key: int, lo: dict = lo, sums: torch.Tensor = sums) -> float:
                return total_at_or_above(key, sums, lo.get(key >> 16, torch.zeros(1)))

            kept = at_or_above(lo_key) - (at_or_above(hi_key) if hi_key is not None else 0.0)
            scale = _scale(float(sums.sum()), kept)
        specs.append({"lo": lo_key, "hi": hi_key, "scale": scale})
    return {"models": specs}


# --- random (DARE): hashed Bernoulli mask, one pass for the L1 rescale ---


def _random_partial(chunk: Chunk, state: Any, rescale_default: bool) -> Any:
    rescale = bool(chunk.params.get("rescale", rescale_default))
    out = []
    for i, mp in enumerate(chunk.model_params):
        density = float(mp.get("density", 1.0))
        if density >= 1:
            out.append(None)
            continue
        entry: dict[str, Any] = {"density": density, "before": None, "after": None}
        if rescale:
            mag = _deltas(chunk, i).abs().to(torch.float64)
            entry["before"] = mag.sum()
            mask = keep_mask(chunk.seed, i, chunk.offset, mag.shape, density)
            entry["after"] = (mag * mask).sum()
        out.append(entry)
    return {"models": out}


def _random_finish(combined: Any, state: Any) -> Any:
    specs = []
    for m in combined["models"]:
        if m is None:
            specs.append(None)
            continue
        scale = 1.0 if m["before"] is None else _scale(float(m["before"]), float(m["after"]))
        specs.append({"density": m["density"], "scale": scale})
    return {"models": specs}


Sparsify = Callable[[Chunk, Any, int], torch.Tensor]  # (chunk, state, model) -> sparsified task vector


def sparsified_delta(chunk: Chunk, state: Any, i: int, sparsification: str | Sparsify | None) -> torch.Tensor:
    """Model i's task vector on this chunk after trimming/dropping and rescaling."""
    if callable(sparsification):  # a method's own sparsification (della's magprune)
        return sparsification(chunk, state, i)
    delta = _deltas(chunk, i)
    if sparsification is None:
        return delta
    if state is None:
        raise ValueError(f"{sparsification} sparsification needs the statistic state")
    spec = state["models"][i]
    if spec is None:
        return delta
    if sparsification == RANDOM:
        keep = keep_mask(chunk.seed, i, chunk.offset, delta.shape, spec["density"])
    else:
        keys = magnitude_keys(delta)
        keep = keys >= spec["lo"]
        if spec["hi"] is not None:
            keep &= keys < spec["hi"]
    delta = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))
    return delta * spec["scale"] if spec["scale"] != 1.0 else delta


def gta_blend(
    chunk: Chunk, state: Any, sparsification: str | Sparsify | None, consensus: bool, normalize_default: bool
) -> torch.Tensor:
    if chunk.base is None:
        raise ValueError("task-arithmetic methods need a base model")
    base = chunk.base
    if not chunk.models:
        return base.clone()
    weights = [float(mp["weight"]) for mp in chunk.model_params]
    normalize = bool(chunk.params.get("normalize", normalize_default))
    lam = float(chunk.params.get("lambda", 1.0))
    # Only task_arithmetic is declared inplace, so only it is handed the engine's scratch.
    inplace = chunk.out is not None
    mixed = chunk.out.zero_() if inplace else torch.zeros_like(base)
    if consensus:
        # Majority sign from the sum of weighted deltas ('sum' consensus), then a second sweep over the
        # models keeps only agreeing deltas; recomputing deltas keeps memory at a few chunks for any N.
        sign_weight = torch.zeros_like(base)
        for i, w in enumerate(weights):
            sign_weight += sparsified_delta(chunk, state, i, sparsification) * w
        positive = sign_weight >= 0
        del sign_weight
        divisor = torch.zeros_like(base)
        for i, w in enumerate(weights):
            wd = sparsified_delta(chunk, state, i, sparsification) * w
            agree = torch.where(positive, wd > 0, wd < 0)
            mixed += torch.where(agree, wd, torch.zeros((), dtype=wd.dtype))
            divisor += agree.to(base.dtype) * w
        divisor[divisor == 0] = 1
    else:
        for i, w in enumerate(weights):
            if inplace:  # the same roundings as below, computed over the scratch inputs
                mixed += chunk.models[i].sub_(base).mul_(w)
            else:
                mixed += sparsified_delta(chunk, state, i, sparsification) * w
        # mergekit's |sum| < 1e-8 -> 1, tested in the dtype the division runs in (as linear does).
        total = float(torch.tensor(weights, dtype=mixed.dtype).sum())
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=mixed) if inplace else base + mixed


def _check_sparsity(name: str, sparsification: str | None, model_params: Any, numel: int) -> str | None:
    """density in (0, 1] for every sparsifying method, as ties has always needed: dare with density
    0 or -1 kept nothing and silently gave the base model. gamma (breadcrumbs) lies in [0, 1]."""
    for i, mp in enumerate(model_params):
        density = float(mp.get("density", 1.0))
        if not 0 < density <= 1:
            return f"model {i}: {name} needs density in (0, 1], got {density}"
        gamma = float(mp.get("gamma", 0.0))
        if not 0 <= gamma <= 1:
            return f"model {i}: {name} needs gamma in [0, 1], got {gamma}"
        if sparsification == MAGNITUDE and density < 1 and int(density * numel) <= 0:
            return f"model {i}: {name}: density {density} keeps no element of a tensor with {numel} elements"
    return None


def make_gta(
    name: str,
    *,
    sparsification: str | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
) -> MergeMethod:
    """A GTA-family MergeMethod with mergekit's parameter names and defaults for `name`."""
    statistic = None
    if sparsification in (MAGNITUDE, OUTLIERS):
        statistic = Statistic(
            passes=2,
            partial=partial(_magnitude_partial, kind=sparsification, rescale_default=default_rescale),
            combine=sum_tree,
            finish=partial(_magnitude_finish, kind=sparsification),
        )
    elif sparsification == RANDOM:
        statistic = Statistic(
            passes=1,
            partial=partial(_random_partial, rescale_default=default_rescale),
            combine=sum_tree,
            finish=_random_finish,
        )

    model_params: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsification == OUTLIERS:
        model_params["gamma"] = 0.01

    def blend(chunk: Chunk, state: Any) -> torch.Tensor:
        return gta_blend(chunk, state, sparsification, consensus, default_normalize)

    def check(params: Any, model_params: Any, numel: int) -> str | None:
        return _check_sparsity(name, sparsification, model_params, numel)

    return MergeMethod(
        name=name,
        blend=blend,
        statistic=statistic,
        needs_base=True,
        random=sparsification == RANDOM,
        inplace=sparsification is None and not consensus,
        model_param_defaults=model_params,
        check=check if sparsification else None,
        param_defaults={
            "int8_mask": False,  # only the dtype of mergekit's mask; results are identical
            "normalize": default_normalize,
            "rescale": default_rescale,
            "lambda": 1.0,
        },
    )
