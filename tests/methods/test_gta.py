"""gta's sign election, computed without selects, against mergekit's formula bit for bit."""

import pytest
import torch

from darwin_stream.methods.gta import _consensus


def _mergekit(weighted, weights, normalize):
    """mergekit's 'sum' consensus as gta_blend computed it before: compare, select, sum."""
    sign_weight = torch.zeros_like(weighted[0])
    for wd in weighted:
        sign_weight += wd
    positive = sign_weight >= 0
    mixed, divisor = torch.zeros_like(sign_weight), torch.zeros_like(sign_weight)
    for wd, w in zip(weighted, weights, strict=True):
        agree = torch.where(positive, wd > 0, wd < 0)
        mixed += torch.where(agree, wd, torch.zeros(()))
        divisor += agree.to(torch.float32) * w
    divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.6, 0.4], [1.0, -0.5, 0.25]])
def test_consensus_is_mergekits_bit_for_bit(normalize, weights):
    g = torch.Generator().manual_seed(len(weights))
    ds = [(torch.randn(4000, generator=g) * 8).round() / 64 for _ in weights]  # zeros and equal values
    ds[0][:50] = -0.0
    ds[1][:100] = -ds[0][:100]  # sums that cancel to exactly 0: the majority is +
    ds[1][100:150] = -0.0
    weighted = [d * w for d, w in zip(ds, weights, strict=True)]
    expected = _mergekit(weighted, weights, normalize)
    got = _consensus([wd.clone() for wd in weighted], weights, normalize)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # signed zeros included
