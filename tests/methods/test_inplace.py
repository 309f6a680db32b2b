"""Methods declared `inplace`: given the engine's scratch (`Chunk.out`), the same bits as allocating."""

from __future__ import annotations

import pytest
import torch

from darwin_stream.methods import Chunk, get, names, run_statistic
from tests.methods.methods_reference import make_inputs

# name -> (takes a base, per-model parameters, method parameters)
CASES = {
    "linear": (False, [{"weight": 0.7}, {"weight": -0.2}], {"normalize": True}),
    "slerp": (True, [{}], {"t": 0.35}),
    "passthrough": (False, [{"scale": 0.5}], {}),
    "task_arithmetic": (True, [{"weight": 0.6}, {"weight": 0.5}], {"normalize": True, "lambda": 0.9}),
    "nearswap": (True, [{}], {"t": 0.004}),
}


def test_the_inplace_methods_are_the_ones_covered_here():
    assert {n for n in names() if get(n).inplace} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scratch_result_is_bit_identical(name):
    with_base, model_params, params = CASES[name]
    base, models = make_inputs((64, 48), len(model_params), seed=3)
    base = base if with_base else None
    method = get(name)

    def chunk(out: torch.Tensor | None = None, copy: bool = False) -> Chunk:
        own = (lambda t: t.clone()) if copy else (lambda t: t)
        return Chunk(models=[own(m) for m in models], model_params=model_params, params=params,
                     base=own(base) if base is not None else None, out=out)

    state = run_statistic(method, lambda: [chunk()])
    expected = method.blend(chunk(), state)
    out = torch.full_like(models[0], float("nan"))  # stale scratch must not leak into the result
    scratch = chunk(out, copy=True)
    got = method.blend(scratch, state)

    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    owned = [out, *scratch.models, *([scratch.base] if scratch.base is not None else [])]
    assert any(got.data_ptr() == t.data_ptr() for t in owned), "the result must live in the engine's scratch"
