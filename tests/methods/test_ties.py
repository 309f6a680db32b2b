import pytest
import torch

from darwin_stream.methods.reduce import sum_tree
from darwin_stream.methods.select import (
    RadixSelect,
    hi_histogram,
    lo_histogram,
    magnitude_keys,
    total_at_or_above,
)
from tests.methods.methods_reference import (
    assert_bf16_close,
    magnitude_mask,
    magnitude_mask_mergekit,
    make_inputs,
    ref_gta,
    run_method,
)


def _select(pieces, ks):
    keys = [magnitude_keys(p) for p in pieces]
    counts = sum_tree([hi_histogram(k, False)[0] for k in keys])
    located = RadixSelect.first(counts, ks)
    lo = sum_tree([{b: lo_histogram(k, b) for b in RadixSelect.bins(located)} for k in keys])
    return RadixSelect.second(located, lo), counts, lo


@pytest.mark.parametrize("quantised", [False, True])
def test_radix_select_is_exact_kth_largest(quantised):
    g = torch.Generator().manual_seed(20)
    x = torch.randn(5000, generator=g) * 0.01
    if quantised:  # many ties, like deltas of bf16 weights
        x = x.to(torch.bfloat16).float()
    x[:50] = 0.0
    desc = torch.sort(x.abs(), descending=True).values
    ks = [1, 2, 17, 2500, 4950, 4951, 5000]
    keys, _, _ = _select(list(x.split(777)), ks)
    for k, key in zip(ks, keys, strict=True):
        value = torch.tensor([key], dtype=torch.int32).view(torch.float32).item()
        assert value == desc[k - 1].item(), k


def test_radix_sum_at_or_above_is_exact():
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(3000, generator=g) * 0.01).to(torch.bfloat16).float()
    keys = magnitude_keys(x)
    _, sums = hi_histogram(keys, True)
    (key,), _, lo = _select([x], [400])
    expected = x.abs().double()[keys >= key].sum().item()
    assert total_at_or_above(key, sums, lo[key >> 16]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rows", [None, 13])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(rows, normalize):
    base, models = make_inputs((128, 96), 3, seed=22)
    weights, densities = [1.0, 0.5, 0.75], [0.2, 0.5, 0.9]  # dyadic: see test_breadcrumbs
    mps = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    out = run_method("ties", base, models, mps, {"normalize": normalize, "lambda": 1.3}, rows)
    masks = [magnitude_mask(m - base, d) for m, d in zip(models, densities, strict=True)]
    ref = ref_gta(base, models, weights, masks=masks, consensus=True, normalize=normalize, lam=1.3)
    assert_bf16_close(out, ref)


def test_ties_chunking_invariant_exactly():
    base, models = make_inputs((90, 70), 2, seed=23)
    mps = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.6}]
    whole = run_method("ties", base, models, mps)
    for rows in (4, 33):
        assert torch.equal(run_method("ties", base, models, mps, rows=rows), whole)


def test_ties_equals_mergekit_topk_without_ties():
    # continuous float64 inputs: no two magnitudes equal, so our tie rule and mergekit's argsort agree
    g = torch.Generator().manual_seed(24)
    base = torch.randn(64, 50, generator=g, dtype=torch.float64) * 0.02
    models = [base + torch.randn(64, 50, generator=g, dtype=torch.float64) * 0.002 for _ in range(2)]
    mps = [{"weight": 1.0, "density": 0.25}, {"weight": 1.0, "density": 0.4}]
    masks = [magnitude_mask_mergekit(m - base, mp["density"]) for m, mp in zip(models, mps, strict=True)]
    assert all(int(m.sum()) == int(mp["density"] * m.numel()) for m, mp in zip(masks, mps, strict=True))
    out = run_method("ties", base, models, mps, rows=10)
    torch.testing.assert_close(
        out, ref_gta(base, models, [1.0, 1.0], masks=masks, consensus=True, normalize=True)
    )


def test_ties_rescale_matches_reference():
    base, models = make_inputs((64, 64), 2, seed=25)
    mps = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5}]
    out = run_method("ties", base, models, mps, {"rescale": True}, rows=9)
    masks = [magnitude_mask(m - base, mp["density"]) for m, mp in zip(models, mps, strict=True)]
    ref = ref_gta(base, models, [1.0, 0.5], masks=masks, consensus=True, normalize=True, rescale=True)
    assert_bf16_close(out, ref)
    plain = run_method("ties", base, models, mps, rows=9)
    assert (out - plain).abs().max() > 1e-4


def test_ties_density_one_and_int8_mask():
    base, models = make_inputs((40, 30), 2, seed=26)
    mps = [{"weight": 1.0, "density": 1.0}, {"weight": 2.0, "density": 1.0}]
    out = run_method("ties", base, models, mps)
    assert_bf16_close(out, ref_gta(base, models, [1.0, 2.0], consensus=True, normalize=True))
    assert torch.equal(run_method("ties", base, models, mps, {"int8_mask": True}), out)


def test_ties_zero_task_vectors_give_base():
    base, _ = make_inputs((20, 20), 0, seed=27)
    out = run_method(
        "ties", base, [base.clone(), base.clone()], [{"weight": 1.0, "density": 0.5}] * 2, rows=6
    )
    assert torch.equal(out, base)


def test_ties_1d_single_chunk():
    base, models = make_inputs((500,), 2, seed=28)
    mps = [{"weight": 1.0, "density": 0.4}] * 2
    out = run_method("ties", base, models, mps)
    masks = [magnitude_mask(m - base, 0.4) for m in models]
    assert_bf16_close(out, ref_gta(base, models, [1.0, 1.0], masks=masks, consensus=True, normalize=True))


def test_ties_density_below_one_element_keeps_the_largest_like_mergekit():
    """mergekit 0.1.5: positive density keeps max(1, int(density * n)) elements."""
    base, models = make_inputs((10,), 1)
    out = run_method("ties", base, models, [{"weight": 1.0, "density": 0.05}], {"normalize": True})
    delta = models[0] - base
    kept = (out - base) != 0
    assert int(kept.sum()) == 1 and bool(kept[delta.abs().argmax()])


def test_ties_keeps_exactly_k_where_magnitudes_tie():
    """Ties at the threshold: exactly mergekit's k are kept, the first ones in flat order, under
    any chunking (one pass of per-row tie counts); keeping them all kept 3 of these 4 here."""
    base = torch.zeros(4, 3)
    model = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.0, 0.1], [0.25, 0.0, 0.0], [0.1, 0.0, 0.0]])
    mps = [{"weight": 1.0, "density": 0.25}]  # k = 3: 0.5 and two of the four 0.25s
    want = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    for rows in (None, 1, 2, 3):
        assert torch.equal(run_method("ties", base, [model], mps, {"normalize": True}, rows), want), rows


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_gathered_bins_give_the_histograms_windows_without_a_third_read(name, monkeypatch):
    """Pass 2 gathers a small boundary bin's elements (select.Members), from which the window and its
    tie counts follow, so pass 3 counts nothing; a bin above MEMBER_LIMIT takes the histograms and
    pass 3's row counts instead. Both keep the same elements."""
    from darwin_stream.methods import gta, select

    base, models = make_inputs((90, 40), 2, seed=21)
    models = [base + ((m - base) * 300).round() / 300 for m in models]  # quantised: split ties
    mps = [{"weight": 0.6, "density": 0.5, "gamma": 0.05}, {"weight": 0.4, "density": 0.3, "gamma": 0.02}]
    counted = []
    real = gta.row_counts
    monkeypatch.setattr(gta, "row_counts", lambda *a: counted.append(1) or real(*a))
    gathered = run_method(name, base, models, mps, rows=7)
    assert not counted
    monkeypatch.setattr(select, "MEMBER_LIMIT", 0)
    histogrammed = run_method(name, base, models, mps, rows=7)
    assert counted, "the quantised task vectors split a tie group"
    assert torch.equal(gathered, histogrammed)
