import math

import pytest
import torch

from darwin_stream.methods.nuslerp import coefficients
from tests.methods.mergekit_reference import ref_nuslerp, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs

MODES = [  # (row_wise, flatten)
    (False, True),
    (False, False),
    (True, False),
]


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("row_wise,flatten", MODES)
@pytest.mark.parametrize("shape", [(64, 48), (500,)])
def test_nuslerp_matches_reference(with_base, row_wise, flatten, shape):
    base, models = make_inputs(shape, 2, seed=51, delta_std=0.01)
    b = base if with_base else None
    mps = [{"weight": 0.3}, {"weight": 0.9}]
    params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    out = run_blocks("nuslerp", b, models, mps, params, rows=7)
    ref = ref_nuslerp(b, models, [0.3, 0.9], row_wise, flatten)
    assert_bf16_close(out, ref)
    # a real angle: not the linear blend
    lin = (0.25 * models[0].double() + 0.75 * models[1].double())
    assert (out.double() - lin).abs().max() > 1e-4


@pytest.mark.parametrize("row_wise,flatten", MODES)
def test_nuslerp_chunking_changes_nothing(row_wise, flatten):
    base, models = make_inputs((40, 24), 2, seed=52, delta_std=0.01)
    mps = [{"weight": 1.0}, {"weight": 2.0}]
    params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    whole = run_blocks("nuslerp", base, models, mps, params)
    for rows in (1, 6, 13):
        chunked = run_blocks("nuslerp", base, models, mps, params, rows=rows)
        # float64 sums in another order: equal up to the last float32 bit of a coefficient
        torch.testing.assert_close(chunked, whole, rtol=2e-7, atol=0)
    vec = make_inputs((300,), 2, seed=53, delta_std=0.01)
    whole = run_blocks("nuslerp", vec[0], vec[1], mps, params)
    torch.testing.assert_close(run_blocks("nuslerp", vec[0], vec[1], mps, params, rows=64), whole, rtol=2e-7, atol=0)


def test_nuslerp_weights_zero_sum_is_midpoint_and_colinear_is_lerp():
    _, models = make_inputs((30, 10), 2, seed=54, delta_std=0.01)
    a = run_blocks("nuslerp", None, models, [{"weight": 1.0}, {"weight": -1.0}])
    b = run_blocks("nuslerp", None, models, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(a, b)
    x = models[0]
    out = run_blocks("nuslerp", None, [x, 3 * x], [{"weight": 0.5}, {"weight": 0.5}])
    torch.testing.assert_close(out, 2 * x)


def test_nuslerp_coefficients_keep_unit_norm_on_the_arc():
    cos = math.cos(1.2)
    for t in (0.1, 0.5, 0.8):
        s0, s1 = (float(s) for s in coefficients(t, *(torch.tensor(v, dtype=torch.float64) for v in (cos, 1.0, 1.0))))
        assert math.isclose(s0 * s0 + s1 * s1 + 2 * s0 * s1 * cos, 1.0, rel_tol=1e-12)


def test_nuslerp_needs_two_models():
    base, models = make_inputs((4, 4), 3)
    with pytest.raises(ValueError, match="exactly two models"):
        run_blocks("nuslerp", base, models, [{"weight": 1.0}] * 3)
