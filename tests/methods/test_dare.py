import math

import pytest
import torch

from darwin_stream.methods.masks import keep_mask, lowbias32, uniform_bits
from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_gta, run_method


def _lowbias32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_hash_matches_python_integers():
    g = torch.Generator().manual_seed(30)
    x = torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    got = lowbias32(x).tolist()
    assert got == [_lowbias32_py(v) for v in x.tolist()]


def test_uniform_bits_depend_only_on_position():
    whole = uniform_bits(7, 1, 0, 1000)
    assert torch.equal(torch.cat([uniform_bits(7, 1, o, 250) for o in range(0, 1000, 250)]), whole)
    assert not torch.equal(uniform_bits(8, 1, 0, 1000), whole)
    assert not torch.equal(uniform_bits(7, 2, 0, 1000), whole)
    big = uniform_bits(7, 1, 2**32 - 5, 10)  # flat indices past 2**32 stay distinct
    assert len(set(big.tolist())) == 10


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_mask_is_bernoulli(density):
    n = 100_000
    a = keep_mask(3, 0, 0, (n,), density)
    b = keep_mask(3, 1, 0, (n,), density)
    assert _within_binomial(int(a.sum()), n, density)
    assert _within_binomial(int((a & b).sum()), n, density * density)  # models drop independently
    assert _within_binomial(int(a[: n // 2].sum()), n // 2, density)


@pytest.mark.parametrize("name,consensus", [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("rows", [None, 29])
def test_dare_matches_reference_given_the_masks(name, consensus, rescale, rows):
    base, models = make_inputs((256, 128), 3, seed=31)
    weights, densities = [0.75, 0.5, 1.0], [0.3, 0.6, 0.9]  # dyadic: see test_breadcrumbs
    mps = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    out = run_method(name, base, models, mps, {"rescale": rescale, "normalize": True}, rows=rows, seed=99)
    masks = [keep_mask(99, i, 0, base.shape, d) for i, d in enumerate(densities)]
    ref = ref_gta(base, models, weights, masks=masks, consensus=consensus, normalize=True, rescale=rescale)
    assert_bf16_close(out, ref)


def test_dare_deterministic_and_chunking_invariant():
    base, models = make_inputs((120, 50), 2, seed=32)
    mps = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}]
    for rescale in (False, True):
        whole = run_method("dare_ties", base, models, mps, {"rescale": rescale}, seed=5)
        assert torch.equal(run_method("dare_ties", base, models, mps, {"rescale": rescale}, seed=5), whole)
        for rows in (3, 64):
            chunked = run_method("dare_ties", base, models, mps, {"rescale": rescale}, rows=rows, seed=5)
            if rescale:  # the L1 sums differ only in float64 summation order
                torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
            else:
                assert torch.equal(chunked, whole)
        assert not torch.equal(
            run_method("dare_ties", base, models, mps, {"rescale": rescale}, seed=6), whole
        )


def test_dare_linear_distribution():
    base, (model,) = make_inputs((400, 250), 1, seed=33)
    delta = (model - base).double()
    density = 0.25
    out = run_method("dare_linear", base, [model], [{"weight": 1.0, "density": density}], rows=50, seed=1)
    merged = (out - base).double()
    kept = merged != 0
    n_nonzero = int((delta != 0).sum())
    assert _within_binomial(int(kept.sum()), n_nonzero, density)
    assert torch.equal(merged[kept].sign(), delta[kept].sign())
    # L1 rescale: the dropped-and-rescaled task vector keeps the L1 norm of the original...
    assert merged.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # ...which is about 1/density on each kept element
    ratio = (merged[kept] / delta[kept]).mean().item()
    assert ratio == pytest.approx(1 / density, rel=0.02)
    no_rescale = run_method(
        "dare_linear", base, [model], [{"weight": 1.0, "density": density}], {"rescale": False}, seed=1
    )
    assert torch.equal(no_rescale - base != 0, kept)


def test_dare_density_one_is_task_arithmetic():
    base, models = make_inputs((30, 20), 2, seed=34)
    mps = [{"weight": 0.5, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    out = run_method("dare_linear", base, models, mps)
    assert torch.equal(out, run_method("task_arithmetic", base, models, mps))


def test_dare_zero_task_vectors_give_base():
    base, _ = make_inputs((16, 8), 0, seed=35)
    out = run_method("dare_ties", base, [base.clone()], [{"weight": 1.0, "density": 0.5}], rows=3)
    assert torch.equal(out, base)


def test_the_wrapping_hash_multiply_is_the_split_one():
    """The masks use one int64 product where torch wraps on overflow; its low 32 bits must be the
    16-bit-split product's for every 32-bit input, edge values included."""
    from darwin_stream.methods import masks

    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randint(0, 2**32, (100_000,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])])
    for c in (0x7FEB352D, 0x846CA68B):
        assert torch.equal(masks._mul32_wrapping(x, c), masks._mul32_split(x, c))
    assert masks._mul32 is masks._mul32_wrapping  # the fast path is the one taken on this build


@pytest.mark.parametrize("offset,n", [(0, 5000), (12345, 77), (2**32 - 5, 10), (2**33 - 3, 9), (3 * 2**32 - 100, 300)])
def test_the_uint32_draws_are_the_reference_bits(offset, n):
    """uniform_u32 (numpy, uint32) draws uniform_bits' bits, across 2**32 boundaries of the flat index."""
    from darwin_stream.methods.masks import uniform_u32

    got = uniform_u32(7, 3, offset, n)
    assert got.dtype.name == "uint32"
    assert got.tolist() == uniform_bits(7, 3, offset, n).tolist()


@pytest.mark.parametrize("density", [0.0, 1e-12, 0.3, 0.999999999999, 1.0])
def test_keep_mask_thresholds_the_reference_bits(density):
    bits = uniform_bits(4, 1, 100, 30 * 7)
    expected = (bits < round(density * 2**32)).reshape(30, 7)
    assert torch.equal(keep_mask(4, 1, 100, (30, 7), density), expected)


def test_a_remembered_mask_is_recalled_once_and_the_cache_is_bounded():
    """dare's statistic keeps its packed masks for the blend (masks._Kept): the recalled mask is the
    drawn one, taken once; a thread keeps at most MASK_CACHE_PER_ELEM bytes per element asking."""
    from darwin_stream.methods import masks

    masks.forget_masks()
    drawn = keep_mask(5, 1, 64, (40, 9), 0.3, remember=True)
    assert masks._kept().bytes == (40 * 9 + 7) // 8
    assert torch.equal(keep_mask(5, 1, 64, (40, 9), 0.3, recall=True), drawn)
    assert masks._kept().bytes == 0  # taken back: a recall draws afresh, the same bits
    assert torch.equal(keep_mask(5, 1, 64, (40, 9), 0.3, recall=True), drawn)
    n = 64
    for offset in range(0, 1000 * n, n):  # each n/8 bytes, under a cap of 16 n bytes: 128 at most
        keep_mask(6, 0, offset, (n,), 0.5, remember=True)
    assert masks._kept().bytes <= masks.MASK_CACHE_PER_ELEM * n
    assert len(masks._kept().masks) == masks.MASK_CACHE_PER_ELEM * 8
    masks.forget_masks()
    assert masks._kept().bytes == 0


def test_dare_blends_the_same_with_and_without_kept_masks(monkeypatch):
    from darwin_stream.methods import masks

    base, models = make_inputs((64, 48), 2, seed=36)
    mps = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}]
    kept = run_method("dare_ties", base, models, mps, rows=8, seed=4)
    monkeypatch.setattr(masks, "MASK_CACHE_PER_ELEM", 0)  # nothing kept: every mask drawn twice
    assert torch.equal(run_method("dare_ties", base, models, mps, rows=8, seed=4), kept)
