import pytest
import torch

from darwin_stream.methods.ram import lambdas
from tests.methods.mergekit_reference import ref_ram, run_blocks
from tests.methods.methods_reference import assert_bf16_close, make_inputs


def _sparse_family(shape, n, seed):
    """Fine-tunes whose task vectors are zero on about half the elements, so counts vary."""
    base, models = make_inputs(shape, n, seed=seed, delta_std=0.004)
    g = torch.Generator().manual_seed(seed)
    return base, [torch.where(torch.rand(shape, generator=g) < 0.5, m, base) for m in models]


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("shape", [(96, 64), (1500,)])
def test_ram_matches_reference(plus, shape):
    base, models = _sparse_family(shape, 3, 111)
    params = {"epsilon": 0.001} | ({"r": 0.5, "alpha": 0.3} if plus else {})
    out = run_blocks("ramplus_tl" if plus else "ram", base, models, params=params, rows=11)
    assert_bf16_close(out, ref_ram(base, models, 0.001, plus, 0.5, 0.3))
    lin = base.double() + sum(m.double() - base.double() for m in models) / 3
    assert (out.double() - lin).abs().max() > 1e-4  # not the plain average


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_chunking_changes_nothing(name):
    base, models = _sparse_family((50, 30), 3, 112)
    whole = run_blocks(name, base, models, params={"epsilon": 0.001})
    for rows in (1, 8, 25):
        assert torch.equal(run_blocks(name, base, models, params={"epsilon": 0.001}, rows=rows), whole)
    vb, vm = _sparse_family((777,), 2, 113)
    assert torch.equal(run_blocks(name, vb, vm, rows=100), run_blocks(name, vb, vm))


def test_ramplus_lambdas_follow_mergekit():
    shared, unique = torch.tensor([30, 0, 5]), torch.tensor([0, 40, 100])
    got = lambdas(shared, unique, r=0.1, alpha=0.2, eps=1e-5)
    # no unique elements: rho is huge and clamped to alpha; none shared: no boost; 5/100 = 0.05
    assert got == pytest.approx([1.02, 1.0, 1.005], rel=1e-7)


def test_ram_single_model_is_task_arithmetic_above_epsilon():
    base, (model,) = _sparse_family((20, 10), 1, 114)
    out = run_blocks("ram", base, [model], params={"epsilon": 0.0})
    assert torch.equal(out, model)
