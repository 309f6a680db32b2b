"""How a breed's `t` becomes a method's inputs: the mappings that several methods share.

`t` is the mother's share: t = 0 always means the father's tensor, t = 1 the mother's (or the full
task vector from the father to the mother). A method declares one of these as its `breed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from darwin_stream.methods.contract import BreedError, BreedInputs, BreedMap, Params, Side


def _weights(t: float, extra: dict[str, Any], params: dict[str, Any]) -> BreedInputs:
    return BreedInputs(models=(Side.FATHER, Side.MOTHER),
                       model_params=({**extra, "weight": 1.0 - t}, {**extra, "weight": t}), params=params)


def _t_param(t: float, extra: dict[str, Any], params: dict[str, Any]) -> BreedInputs:
    return BreedInputs(models=(Side.MOTHER,), model_params=(extra,), params={**params, "t": t}, base=Side.FATHER)


def _task_vector(t: float, extra: dict[str, Any], params: dict[str, Any]) -> BreedInputs:
    return BreedInputs(models=(Side.MOTHER,), model_params=({**extra, "weight": t},), params=params, base=Side.FATHER)


def _choose(t: float, extra: dict[str, Any], params: dict[str, Any]) -> BreedInputs:
    if t not in (0.0, 1.0):
        raise BreedError(f"passthrough takes one parent whole: t must be 0 (father) or 1 (mother), got {t}")
    return BreedInputs(models=(Side.FATHER if t == 0.0 else Side.MOTHER,), model_params=(), params=params)


def _weight_of(i: int):
    def read(model_params: Sequence[Params], params: Params) -> float:
        return float(model_params[i]["weight"])

    return read


def _read_t(model_params: Sequence[Params], params: Params) -> float:
    return float(params["t"])


# linear: the two parents weighted 1 - t and t.
WEIGHTS = BreedMap(inputs=_weights, read=_weight_of(1))
# slerp and the like: the father is the base, the mother the other model, `t` the method's own.
T_PARAM = BreedMap(inputs=_t_param, read=_read_t)
# task-vector methods: the father is the base, the mother's task vector is weighted t.
TASK_VECTOR = BreedMap(inputs=_task_vector, read=_weight_of(0))
# passthrough: one parent whole, so t is 0 or 1 and no gene can search it.
CHOOSE = BreedMap(inputs=_choose, read=_weight_of(0), searchable=False)
