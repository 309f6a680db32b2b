import math

import pytest
import torch

from darwin_stream.methods.masks import uniform_bits
from tests.methods.mergekit_reference import hashed_uniforms, magprune_mask, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_gta

W, D, E = [0.75, 0.5], [0.5, 0.25], [0.125, 0.0625]  # dyadic: exact in float32, see test_breadcrumbs


def _within_binomial(count: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("name,consensus", [("della", True), ("della_linear", False)])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (700,)])
def test_della_matches_reference_given_the_draws(name, consensus, rescale, shape):
    base, models = make_inputs(shape, 2, seed=81)
    mps = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(W, D, E, strict=True)]
    out = run_blocks(name, base, models, mps, {"rescale": rescale, "normalize": True}, rows=13, seed=7)
    masks = [
        magprune_mask(m - base, d, e, hashed_uniforms(7, i, shape))
        for i, (m, d, e) in enumerate(zip(models, D, E, strict=True))
    ]
    ref = ref_gta(base, models, W, masks=masks, consensus=consensus, normalize=True, rescale=rescale)
    assert_bf16_close(out, ref)


@pytest.mark.parametrize("shape", [(40, 30), (333,)])
def test_della_chunking_changes_nothing_and_is_seeded(shape):
    base, models = make_inputs(shape, 2, seed=82)
    mps = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(W, D, E, strict=True)]
    whole = run_blocks("della", base, models, mps, seed=3)
    assert torch.equal(run_blocks("della", base, models, mps, seed=3), whole)
    for rows in (1, 7, 32):
        # only the float64 L1 sums change order: equal to float32 rounding of the rescale
        torch.testing.assert_close(run_blocks("della", base, models, mps, rows=rows, seed=3), whole, rtol=2e-7, atol=0)
    assert not torch.equal(run_blocks("della", base, models, mps, seed=4), whole)


def test_magprune_keeps_by_magnitude_rank_in_distribution():
    base, (model,) = make_inputs((200, 400), 1, seed=83)
    delta = (model - base).double()
    density, eps = 0.4, 0.2
    out = run_blocks("della_linear", base, [model], [{"weight": 1.0, "density": density, "epsilon": eps}], rows=50, seed=1)
    merged = (out - base).double()
    kept = merged != 0
    nz = delta != 0
    assert _within_binomial(float((kept & nz).sum()), int(nz.sum()), density, sigmas=6)
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
    probs = (density - eps) + ranks / 399 * 2 * eps
    for part in (ranks < 40, ranks >= 360):  # the smallest and largest tenth of each row
        sel = part & nz  # a zero delta is dropped or kept unseen
        expected, var = float(probs[sel].sum()), float((probs[sel] * (1 - probs[sel])).sum())
        assert abs(float((kept & sel).sum()) - expected) <= 6 * math.sqrt(var)
    assert float(probs[ranks >= 360].mean()) - float(probs[ranks < 40].mean()) > 0.3
    # the L1 rescale restores the task vector's L1 norm
    assert merged.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_della_parameter_checks_and_edges():
    base, models = make_inputs((10, 8), 1, seed=84)
    with pytest.raises(ValueError, match=r"epsilon 0\.3 must keep density 0\.8"):
        run_blocks("della", base, models, [{"weight": 1.0, "density": 0.8, "epsilon": 0.3}])
    same = run_blocks("della", base, models, [{"weight": 1.0, "density": 1.0}])
    assert torch.equal(same, run_blocks("ties", base, models, [{"weight": 1.0, "density": 1.0}]))


@pytest.mark.parametrize("density,epsilon", [(0.4, 0.2), (0.05, 0.1)])  # the second: some p < 0
@pytest.mark.parametrize("shape", [(40, 64), (7, 5, 6), (3, 1)])
def test_keep_is_the_stable_rank_formula(shape, density, epsilon):
    """della.keep (ranks from one sort of key << 32 | position, thresholds per rank) keeps exactly what
    mergekit's float32 probabilities of stable ranks along dim 1 keep, quantised ties included."""
    from darwin_stream.methods.contract import Chunk
    from darwin_stream.methods.della import keep
    from darwin_stream.methods.select import magnitude_keys

    g = torch.Generator().manual_seed(5)
    delta = (torch.randn(shape, generator=g) * 8).round() / 64  # many equal magnitudes
    chunk = Chunk(models=[delta], model_params=[{"density": density, "epsilon": epsilon}], params={},
                  offset=0, numel=delta.numel(), shape=shape, seed=11)
    m = shape[1]
    keys = magnitude_keys(delta)
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, m + 1).reshape(1, -1, *([1] * (len(shape) - 2))).expand_as(order))
    rank_norm = ((ranks.to(torch.float32) - 1) / max(m - 1, 1)).clamp_(0, 1)
    probs = (rank_norm * 2 * epsilon) + (density - epsilon)
    u = uniform_bits(11, 0, 0, delta.numel()).reshape(shape)
    expected = u.to(torch.float64) < probs.to(torch.float64) * 2.0**32
    assert torch.equal(keep(chunk, 0, delta, None), expected)
