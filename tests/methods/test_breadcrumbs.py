import pytest
import torch

from tests.methods.methods_reference import (
    assert_bf16_close,
    make_inputs,
    outliers_mask,
    ref_gta,
    run_method,
    window_mask,
)


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("rows", [None, 48])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_matches_reference(name, consensus, rows, rescale):
    base, models = make_inputs((192, 128), 3, seed=40)
    # Dyadic weights: where sum_i w_i*delta_i is exactly 0 the elected sign would otherwise hinge on
    # rounding, which float32 and the float64 reference do differently.
    weights, densities, gammas = [1.0, 0.625, 0.875], [0.3, 0.5, 0.8], [0.01, 0.05, 0.15]
    mps = [
        {"weight": w, "density": d, "gamma": gm} for w, d, gm in zip(weights, densities, gammas, strict=True)
    ]
    out = run_method(name, base, models, mps, {"normalize": True, "rescale": rescale}, rows=rows)
    masks = [outliers_mask(m - base, d, gm) for m, d, gm in zip(models, densities, gammas, strict=True)]
    ref = ref_gta(base, models, weights, masks=masks, consensus=consensus, normalize=True, rescale=rescale)
    assert_bf16_close(out, ref)


def test_breadcrumbs_drops_the_top_and_the_bottom():
    base, (model,) = make_inputs((200, 100), 1, seed=41)
    delta = model - base
    density, gamma = 0.4, 0.02
    out = run_method(
        "breadcrumbs", base, [model], [{"weight": 1.0, "density": density, "gamma": gamma}], rows=17
    )
    kept = (out - base) != 0
    mags = torch.sort(delta.abs().reshape(-1), descending=True).values
    n = delta.numel()
    n_top, target = int(gamma * n), int(density * n)
    assert not (delta.abs()[kept] > mags[n_top - 1]).any()  # the largest gamma fraction is gone
    assert delta.abs()[kept].min() >= mags[n_top + target - 1]  # and so is the small tail
    assert int(kept.sum()) == target  # exactly mergekit's count, ties at either edge included


def test_breadcrumbs_gamma_below_one_element_keeps_the_top_density_like_mergekit():
    """mergekit 0.1.5 keeps sorted[n_bot : n_bot + target] (0.1.x's [n_bot:-n_top] was empty at n_top 0)."""
    base, (model,) = make_inputs((40,), 1, seed=42)
    out = run_method("breadcrumbs", base, [model], [{"weight": 1.0, "density": 0.5, "gamma": 0.01}])
    delta = model - base
    keep = window_mask(delta.abs(), 0, 20)
    assert torch.equal(out, base + torch.where(keep, delta, torch.zeros(())))
    assert not torch.equal(out, base)


def test_breadcrumbs_density_one_keeps_everything():
    base, models = make_inputs((50, 20), 2, seed=43)
    mps = [{"weight": 1.0, "density": 1.0, "gamma": 0.1}] * 2
    out = run_method("breadcrumbs", base, models, mps)
    assert torch.equal(out, run_method("task_arithmetic", base, models, [{"weight": 1.0}] * 2))


def test_breadcrumbs_chunking_invariant_exactly():
    base, models = make_inputs((64, 40), 2, seed=44)
    mps = [{"weight": 1.0, "density": 0.3, "gamma": 0.05}] * 2
    whole = run_method("breadcrumbs_ties", base, models, mps)
    for rows in (5, 16):
        assert torch.equal(run_method("breadcrumbs_ties", base, models, mps, rows=rows), whole)
