import pytest
import torch

from tests.methods.mergekit_reference import ref_nearswap, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs


@pytest.mark.parametrize("t", [0.0005, 0.002, 0.01])
@pytest.mark.parametrize("shape", [(96, 40), (300,)])
def test_nearswap_matches_reference(t, shape):
    base, (other,) = make_inputs(shape, 1, seed=41, delta_std=0.003)
    out = run_blocks("nearswap", base, [other], params={"t": t})
    ref = ref_nearswap(t, base, other)
    assert_bf16_close(out, ref)
    # a real mix: some elements are swapped whole, others are partial blends
    w = ((t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)).double()
    assert ((w > 0) & (w < 1)).any() and (w == 1).any()


def test_nearswap_chunking_changes_nothing():
    base, (other,) = make_inputs((64, 24), 1, seed=42)
    whole = run_blocks("nearswap", base, [other], params={"t": 0.002})
    for rows in (1, 5, 17):
        assert torch.equal(run_blocks("nearswap", base, [other], params={"t": 0.002}, rows=rows), whole)


def test_nearswap_t_zero_is_the_base_and_equal_inputs_stay():
    base, (other,) = make_inputs((20, 8), 1, seed=43)
    assert torch.equal(run_blocks("nearswap", base, [other], params={"t": 0.0}), base)
    assert torch.equal(run_blocks("nearswap", base, [base.clone()], params={"t": 0.5}), base)


def test_nearswap_needs_one_other_model():
    base, models = make_inputs((4, 4), 2)
    with pytest.raises(ValueError, match="exactly one other"):
        run_blocks("nearswap", base, models, params={"t": 0.1})
