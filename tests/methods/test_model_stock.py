import pytest
import torch

from tests.methods.methods_reference import assert_bf16_close, make_inputs, ref_model_stock, run_method


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("rows", [None, 19])
@pytest.mark.parametrize("n_models", [2, 4])
def test_model_stock_matches_reference(filter_wise, rows, n_models):
    base, models = make_inputs((160, 96), n_models, seed=50, delta_std=0.002, shared_std=0.002)
    out = run_method("model_stock", base, models, params={"filter_wise": filter_wise}, rows=rows)
    ref = ref_model_stock(base, models, filter_wise)
    assert_bf16_close(out, ref)
    assert (out - base).abs().max() > 1e-4  # a real move away from the base


def test_model_stock_identical_models_give_the_model():
    base, (model,) = make_inputs((30, 20), 1, seed=51)
    out = run_method("model_stock", base, [model, model.clone()], rows=7)
    torch.testing.assert_close(out, model)


def test_model_stock_zero_task_vectors_give_base():
    base, _ = make_inputs((12, 12), 0, seed=52)
    for filter_wise in (False, True):
        out = run_method(
            "model_stock", base, [base.clone(), base.clone()], params={"filter_wise": filter_wise}
        )
        assert torch.equal(out, base)


def test_model_stock_1d_filter_wise_is_one_vector():
    base, models = make_inputs((300,), 3, seed=53, shared_std=0.002)
    out = run_method("model_stock", base.double(), [m.double() for m in models], params={"filter_wise": True})
    torch.testing.assert_close(out, ref_model_stock(base, models, False))


def test_model_stock_needs_two_models():
    base, models = make_inputs((4, 4), 1)
    with pytest.raises(ValueError, match="two"):
        run_method("model_stock", base, models)


def test_model_stock_filter_wise_1d_split_into_blocks_is_still_one_vector():
    from tests.methods.mergekit_reference import run_blocks

    base, models = make_inputs((300,), 3, seed=54, shared_std=0.002)
    whole = ref_model_stock(base, models, False)
    assert_bf16_close(run_blocks("model_stock", base, models, params={"filter_wise": True}, rows=64), whole)


def test_model_stock_filter_wise_over_several_tasks(pair, tmp_path):
    """A filter_wise tensor split over several tasks merges (it used to trip an assertion) and
    equals the tensor merged in one task."""
    from safetensors.torch import load_file

    from darwin_stream import engine
    from darwin_stream.child_writer import ChildWriter
    from darwin_stream.plan import Plan, SourceRef, TensorPlan

    dirs, shapes = pair
    tensors = [
        TensorPlan(name=n, shape=s, dtype="BF16", method="model_stock", models=(SourceRef("b", n), SourceRef("b", n)),
                   model_params=({}, {}), params={"filter_wise": True}, base=SourceRef("a", n), seed=1)
        for n, s in shapes.items()
    ]
    plan = Plan(parents={"a": dirs[0], "b": dirs[1]}, tensors=tensors, config_from="a", tokenizer_from="a")
    assert engine.chunk_rows(plan, tensors[0], 40_000, workers=engine.worker_count()) < shapes["big.weight"][0]
    out = {}
    for budget in (40_000, 2**30):
        writer = ChildWriter(tmp_path / str(budget), plan, shard_size=10**9)
        engine.run(plan, writer, budget=budget)
        writer.finish()
        out[budget] = load_file(str(tmp_path / str(budget) / "model.safetensors"))
    for n in shapes:
        assert torch.equal(out[40_000][n].view(torch.int16), out[2**30][n].view(torch.int16)), n
