import pytest
import torch

from darwin_stream.methods.karcher import coefficients
from darwin_stream.methods.reduce import gram
from tests.methods.mergekit_reference import ref_karcher, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape", [(64, 48), (400,)])
def test_karcher_matches_reference(n, shape):
    _, models = make_inputs(shape, n, seed=70 + n, delta_std=0.02)  # directions far apart
    out = run_blocks("karcher", None, models, rows=11)
    ref = ref_karcher(models)
    assert_bf16_close(out, ref)
    if n > 2:  # the Karcher mean is not the normalised Euclidean mean for three or more directions
        euclid = sum(m.double() / m.double().norm() for m in models)
        euclid = euclid / euclid.norm() * sum(m.double().norm() for m in models) / n
        assert (out.double() - euclid).abs().max() > 1e-5


def test_karcher_iterations_converge_and_max_iter_is_honoured():
    _, models = make_inputs((50, 30), 4, seed=75, delta_std=0.02)
    g = gram(models)
    for iters in (0, 1, 3):
        got = torch.tensor(coefficients(g, iters, 1e-5))
        ref = ref_karcher(models, max_iter=iters)
        torch.testing.assert_close(sum(k * m.double() for k, m in zip(got, models, strict=True)), ref)
    one, ten = coefficients(g, 1, 1e-5), coefficients(g, 10, 1e-5)
    assert one != ten  # more than one iteration is needed here


def test_karcher_chunking_changes_nothing():
    _, models = make_inputs((40, 20), 3, seed=76, delta_std=0.02)
    whole = run_blocks("karcher", None, models)
    for rows in (1, 7, 19):
        torch.testing.assert_close(run_blocks("karcher", None, models, rows=rows), whole, rtol=2e-7, atol=0)


def test_karcher_edge_cases():
    _, models = make_inputs((10, 6), 2, seed=77)
    assert torch.equal(run_blocks("karcher", None, models[:1]), models[0])
    zero = torch.zeros_like(models[0])
    assert torch.equal(run_blocks("karcher", None, [zero, zero]), zero)
    # a zero input is skipped for the direction but counts in the mean norm, as in mergekit
    got = run_blocks("karcher", None, [models[0], zero])
    torch.testing.assert_close(got, models[0] / 2)
    assert_bf16_close(got, ref_karcher([models[0], zero]))
