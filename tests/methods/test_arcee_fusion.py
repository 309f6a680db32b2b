import pytest
import torch

from darwin_stream.methods.select import key_value, ordered_keys
from tests.methods.mergekit_reference import ref_arcee_fusion, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs


@pytest.mark.parametrize("shape", [(128, 96), (3000,)])
def test_arcee_fusion_matches_reference(shape):
    base, (other,) = make_inputs(shape, 1, seed=101, delta_std=0.01)
    out = run_blocks("arcee_fusion", base, [other], rows=23)
    assert_bf16_close(out, ref_arcee_fusion(base, other))
    took = (out != base) & (other != base)
    assert 0 < took.double().mean() < 0.5  # a real selection: the outliers of the importance


@pytest.mark.parametrize("shape", [(64, 40), (1000,)])
def test_arcee_fusion_chunking_changes_nothing(shape):
    base, (other,) = make_inputs(shape, 1, seed=102, delta_std=0.01)
    whole = run_blocks("arcee_fusion", base, [other])
    for rows in (1, 9, 50):
        assert torch.equal(run_blocks("arcee_fusion", base, [other], rows=rows), whole)


def test_ordered_keys_order_signed_floats_and_invert():
    x = torch.tensor([-3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf"), -float("inf")])
    keys = ordered_keys(x)
    assert keys.min() >= 0 and keys.max() < 2**32
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(x, stable=True))
    assert [key_value(int(k)) for k in keys] == x.tolist()


def test_arcee_fusion_identical_models_give_the_base():
    base, _ = make_inputs((20, 10), 0, seed=103)
    assert torch.equal(run_blocks("arcee_fusion", base, [base.clone()], rows=3), base)
