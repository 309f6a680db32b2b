import pytest
import torch

from tests.methods.mergekit_reference import ref_multislerp, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs

W3 = [0.5, 0.3, 0.2]


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (400,)])
def test_multislerp_matches_reference(with_base, normalize, shape):
    base, models = make_inputs(shape, 3, seed=61, delta_std=0.01)
    b = base if with_base else None
    mps = [{"weight": w} for w in W3]
    out = run_blocks("multislerp", b, models, mps, {"normalize_weights": normalize}, rows=9)
    ref = ref_multislerp(b, models, W3, normalize)
    assert_bf16_close(out, ref)
    if with_base:  # task vectors at real angles: not the linear blend
        lin = base.double() + sum(w * (m.double() - base.double()) for w, m in zip(W3, models, strict=True))
        assert (out.double() - lin).abs().max() > 1e-4


def test_multislerp_chunking_changes_nothing():
    base, models = make_inputs((48, 20), 3, seed=62, delta_std=0.01)
    mps = [{"weight": w} for w in W3]
    whole = run_blocks("multislerp", base, models, mps)
    for rows in (1, 5, 16):
        # only the float64 Gram sums change order: equal to float32 rounding of a coefficient
        torch.testing.assert_close(run_blocks("multislerp", base, models, mps, rows=rows), whole, rtol=2e-7, atol=0)


def test_multislerp_one_model_is_that_model_and_antipodes_fall_back_or_raise():
    base, models = make_inputs((16, 8), 1, seed=63)
    assert torch.equal(run_blocks("multislerp", base, models, [{"weight": 1.0}]), models[0])
    x = models[0]
    two = run_blocks("multislerp", None, [x, -x], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(two, torch.zeros_like(x))  # the linear fallback: 0.5 x - 0.5 x
    with pytest.raises(ValueError, match="weighted sum of the unit vectors is zero"):
        run_blocks("multislerp", None, [x, -x, x, -x], [{"weight": 1.0}] * 4)
    with pytest.raises(ValueError, match="sum to zero"):
        run_blocks("multislerp", None, [x, 2 * x], [{"weight": 1.0}, {"weight": -1.0}])
