import math

import pytest
import torch

from darwin_stream.methods.slerp import coefficients
from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_slerp, run_method


@pytest.mark.parametrize("t", [0.1, 0.5, 0.83])
@pytest.mark.parametrize("rows", [None, 9])
def test_slerp_matches_reference(t, rows):
    base, (other,) = make_inputs((128, 64), 1, seed=4, delta_std=0.02)  # far apart: a real angle
    out = run_method("slerp", base, [other], params={"t": t}, rows=rows)
    assert_bf16_close(out, ref_slerp(t, base, other))
    # not lerp: the angle is large enough that the two differ visibly
    assert (out - ((1 - t) * base + t * other)).abs().max() > 1e-4


@pytest.mark.parametrize("rows", [None, 3])
def test_slerp_endpoints_are_exact(rows):
    base, (other,) = make_inputs((40, 24), 1, seed=5, delta_std=0.02)
    assert torch.equal(run_method("slerp", base, [other], params={"t": 0.0}, rows=rows), base)
    assert torch.equal(run_method("slerp", base, [other], params={"t": 1.0}, rows=rows), other)


def test_slerp_colinear_falls_back_to_lerp():
    base, _ = make_inputs((30, 10), 0, seed=6)
    for other in (base * 3, -base * 0.5):
        out = run_method("slerp", base, [other], params={"t": 0.3}, rows=4)
        torch.testing.assert_close(out, 0.7 * base + 0.3 * other)


def test_slerp_zero_vector_is_not_normalised():
    _, (other,) = make_inputs((50,), 1, seed=7)
    zero = torch.zeros_like(other)
    out = run_method("slerp", zero, [other], params={"t": 0.25})
    # cos = 0 -> theta = pi/2: result is sin(t*pi/2) * other
    torch.testing.assert_close(out, math.sin(0.25 * math.pi / 2) * other)
    assert_bf16_close(out, ref_slerp(0.25, zero, other))


def test_slerp_coefficients_preserve_norm_of_unit_vectors():
    # For unit vectors at angle theta, |s0 a + s1 b| == 1 along the whole arc.
    cos = math.cos(1.0)
    for t in (0.2, 0.5, 0.9):
        s0, s1 = coefficients(t, cos, 1.0, 1.0)
        assert math.isclose(s0 * s0 + s1 * s1 + 2 * s0 * s1 * cos, 1.0, rel_tol=1e-12)


def test_slerp_float64_and_1d():
    base, (other,) = make_inputs((257,), 1, seed=8, delta_std=0.02)
    out = run_method("slerp", base.double(), [other.double()], params={"t": 0.4})
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_slerp(0.4, base, other))


def test_slerp_needs_two_models():
    base, models = make_inputs((4, 4), 2)
    with pytest.raises(ValueError, match="exactly one other"):
        run_method("slerp", base, models, params={"t": 0.5})
