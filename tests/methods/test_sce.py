import pytest
import torch

from tests.methods.mergekit_reference import ref_sce, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("shape", [(128, 96), (2000,)])
def test_sce_matches_reference(topk, shape):
    # deltas of about 0.02: mean squares above mergekit's 1e-6 floor, so the weights are not uniform
    base, models = make_inputs(shape, 3, seed=91, delta_std=0.02, shared_std=0.01)
    out = run_blocks("sce", base, models, params={"select_topk": topk}, rows=17)
    assert_bf16_close(out, ref_sce(base, models, topk))
    if topk < 1:  # the selection really removes elements
        assert (out == base).double().mean() > (1 - topk) * 0.9


def test_sce_small_task_vectors_get_equal_weights():
    base, models = make_inputs((64, 32), 3, seed=92, delta_std=0.002)  # mean squares ~4e-6 summed ~1e-5
    # mean squares ~4e-8 to ~4e-7, summed below the floor: equal weights, not 1 : 4 : 9
    tiny = [base + (m - base) * 0.1 * (i + 1) for i, m in enumerate(models)]
    out = run_blocks("sce", base, tiny, rows=9)
    assert_bf16_close(out, ref_sce(base, tiny))
    big = [base + (t - base) * 100 for t in tiny]  # the same directions, above the floor
    scaled = run_blocks("sce", base, big, rows=9)
    assert_bf16_close(scaled, ref_sce(base, big))
    assert ((scaled - base) / 100 - (out - base)).abs().max() > 1e-5


@pytest.mark.parametrize("topk", [1.0, 0.25])
def test_sce_chunking_changes_nothing(topk):
    base, models = make_inputs((60, 40), 3, seed=93, delta_std=0.02)
    whole = run_blocks("sce", base, models, params={"select_topk": topk})
    for rows in (1, 7, 33):
        # the selection is exact; only the float64 sums of squares change order
        chunked = run_blocks("sce", base, models, params={"select_topk": topk}, rows=rows)
        torch.testing.assert_close(chunked, whole, rtol=2e-7, atol=0)
    vec_base, vec = make_inputs((999,), 2, seed=94, delta_std=0.02)
    whole = run_blocks("sce", vec_base, vec, params={"select_topk": topk})
    torch.testing.assert_close(run_blocks("sce", vec_base, vec, params={"select_topk": topk}, rows=100), whole, rtol=2e-7, atol=0)


def test_sce_edges():
    base, models = make_inputs((12, 8), 2, seed=95)
    assert torch.equal(run_blocks("sce", base, models, params={"select_topk": 0.0}), base)
    assert torch.equal(run_blocks("sce", base, [base.clone(), base.clone()], params={"select_topk": 0.5}), base)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("scale", [1e-30, 0.02, 1e30])
def test_the_variance_is_torch_var_bit_for_bit(n, scale):
    """sce.variance replaces torch.var (its selection must see mergekit's float32 variances)."""
    from darwin_stream.methods.sce import variance

    g = torch.Generator().manual_seed(n)
    ds = [torch.randn(20000, generator=g) * scale for _ in range(n)]
    ds[0][:100] = 0
    if n > 1:
        ds[1][100:200] = ds[0][100:200]
    ds[0][200:210] = 3e38  # a float64 variance beyond float32's range: inf in both
    expected = torch.var(torch.stack(ds), dim=0, unbiased=False)
    assert torch.equal(variance(ds).view(torch.int32), expected.view(torch.int32))


def test_gathered_threshold_bin_selects_what_the_histograms_select(monkeypatch):
    """sce's LOW pass gathers a small threshold bin (select.Members) and its TIES pass then counts
    nothing; above MEMBER_LIMIT the histograms and the TIES pass select the same elements."""
    from darwin_stream.methods import sce, select

    base, models = make_inputs((80, 30), 2, seed=95, delta_std=0.02)
    models = [base + ((m - base) * 200).round() / 200 for m in models]  # quantised: tied variances
    counted = []
    real = sce.row_counts
    monkeypatch.setattr(sce, "row_counts", lambda *a: counted.append(1) or real(*a))
    gathered = run_blocks("sce", base, models, params={"select_topk": 0.3}, rows=9)
    assert not counted
    monkeypatch.setattr(select, "MEMBER_LIMIT", 0)
    histogrammed = run_blocks("sce", base, models, params={"select_topk": 0.3}, rows=9)
    assert counted, "the quantised variances split the threshold's ties"
    assert torch.equal(gathered, histogrammed)
