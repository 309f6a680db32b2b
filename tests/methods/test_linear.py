import pytest
import torch

from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_linear, run_method


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rows", [None, 7])
def test_linear_matches_reference(normalize, rows):
    _, models = make_inputs((96, 64), 3, seed=1)
    weights = [0.5, 1.5, -0.25]
    mps = [{"weight": w} for w in weights]
    out = run_method("linear", None, models, mps, {"normalize": normalize}, rows=rows)
    assert_bf16_close(out, ref_linear(models, weights, normalize))


def test_linear_normalize_is_default():
    _, models = make_inputs((16, 8), 2, seed=2)
    out = run_method("linear", None, models, [{"weight": 1.0}, {"weight": 3.0}])
    assert_bf16_close(out, (models[0] + 3 * models[1]) / 4)


def test_linear_1d_and_float64():
    _, models = make_inputs((300,), 2, seed=3)
    models = [m.double() for m in models]
    out = run_method("linear", None, models, [{"weight": 2.0}, {"weight": 1.0}])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_linear(models, [2.0, 1.0], True))


def test_linear_zero_weight_sum_with_normalize_raises():
    _, models = make_inputs((8, 8), 2)
    with pytest.raises(ValueError, match="sum to zero"):
        run_method("linear", None, models, [{"weight": 1.0}, {"weight": -1.0}])
    out = run_method("linear", None, models, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": False})
    torch.testing.assert_close(out, models[0] - models[1])


def test_linear_refuses_a_separate_base():
    base, models = make_inputs((8, 8), 2)
    with pytest.raises(ValueError, match="base"):
        run_method("linear", base, models, [{"weight": 1.0}, {"weight": 1.0}])
