"""What must be bred again when a live model goes from one plan child to the next.

An evolution run breeds hundreds of children from one template plan, and a genome often moves only
some of the knobs (one layer's weight, one role's t): every tensor whose plan did not change from
the child already in the model holds the right values and need not be blended again. Shared by the
in-place backends (transformers today; vLLM once its reload takes a partial set of weights).
"""

from __future__ import annotations

import copy

from darwin_stream.plan import Plan, TensorPlan


def same_blend(old: Plan, new: Plan, old_tp: TensorPlan, new_tp: TensorPlan) -> bool:
    """Whether two tensor plans produce the same bytes: equal plans (sources, method, params,
    model_params, seed, dtype...) reading parent keys that name the same parents in both plans."""
    if old_tp != new_tp:
        return False
    return all(old.parents.get(s.parent) == new.parents.get(s.parent) for s in new_tp.sources())


def changed_tensors(old: Plan | None, new: Plan) -> list[TensorPlan]:
    """The tensors of `new` that a model holding `old`'s child must breed again, in `new`'s order.

    With no `old` (nothing bred yet, or a model whose contents are unknown) that is every tensor.
    """
    if old is None:
        return list(new.tensors)
    before = {tp.name: tp for tp in old.tensors}
    return [tp for tp in new.tensors if tp.name not in before or not same_blend(old, new, before[tp.name], tp)]


def snapshot(plan: Plan) -> Plan:
    """A copy of `plan` that later edits of `plan` cannot reach, to diff the next child against.

    A TensorPlan is frozen but its `params` and `model_params` dicts are not: a template that
    writes each genome into the same dicts would otherwise make the live child's plan equal to
    every next one, and nothing would be bred again. Copying a 0.6B-geometry plan (310 tensors)
    costs a few milliseconds against seconds of breeding.
    """
    return copy.deepcopy(plan)
