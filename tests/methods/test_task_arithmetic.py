import pytest
import torch

from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_gta, run_method


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.7])
@pytest.mark.parametrize("rows", [None, 37])
def test_task_arithmetic_matches_reference(normalize, lam, rows):
    base, models = make_inputs((256, 160), 3, seed=10)
    weights = [0.6, 0.9, -0.3]
    out = run_method(
        "task_arithmetic",
        base,
        models,
        [{"weight": w} for w in weights],
        {"normalize": normalize, "lambda": lam},
        rows,
    )
    assert_bf16_close(out, ref_gta(base, models, weights, normalize=normalize, lam=lam))


def test_task_arithmetic_zero_weight_sum_does_not_divide():
    base, models = make_inputs((32, 16), 2, seed=11)
    mps = [{"weight": 1.0}, {"weight": -1.0}]
    out = run_method("task_arithmetic", base, models, mps, {"normalize": True})
    torch.testing.assert_close(out, base + (models[0] - models[1]))


def test_task_arithmetic_zero_task_vectors_give_base():
    base, _ = make_inputs((16, 16), 0, seed=12)
    out = run_method(
        "task_arithmetic", base, [base.clone(), base.clone()], [{"weight": 1.0}, {"weight": 2.0}]
    )
    assert torch.equal(out, base)


def test_task_arithmetic_1d_float64():
    base, models = make_inputs((123,), 2, seed=13)
    base, models = base.double(), [m.double() for m in models]
    out = run_method("task_arithmetic", base, models, [{"weight": 0.5}, {"weight": 0.25}])
    torch.testing.assert_close(out, ref_gta(base, models, [0.5, 0.25]))


def test_task_arithmetic_needs_base():
    _, models = make_inputs((4, 4), 1)
    with pytest.raises(ValueError, match="base"):
        run_method("task_arithmetic", None, models, [{"weight": 1.0}])
