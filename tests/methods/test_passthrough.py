import pytest
import torch

from tests.methods.methods_reference import make_inputs, run_method


@pytest.mark.parametrize("rows", [None, 5])
def test_passthrough_copies_rows(rows):
    _, models = make_inputs((32, 16), 1)
    out = run_method("passthrough", None, models, [{}], rows=rows)
    assert torch.equal(out, models[0])
    assert out.data_ptr() != models[0].data_ptr()


def test_passthrough_scale():
    _, models = make_inputs((20,), 1)
    out = run_method("passthrough", None, models, [{"scale": 0.5}])
    torch.testing.assert_close(out, models[0] * 0.5, rtol=0, atol=0)


def test_passthrough_needs_exactly_one_input():
    base, models = make_inputs((4, 4), 2)
    with pytest.raises(ValueError, match="exactly one"):
        run_method("passthrough", None, models, [{}, {}])
    with pytest.raises(ValueError, match="exactly one"):
        run_method("passthrough", base, models[:1], [{}])
