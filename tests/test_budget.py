"""A budget below the smallest the plan can run in is refused, naming that minimum."""

from __future__ import annotations

import pytest

from darwin_stream import engine
from darwin_stream.api import load_plan, merge
from darwin_stream.cli import main
from darwin_stream.errors import DarwinError

MANIFEST = """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: 0.5
dtype: bfloat16
"""


@pytest.fixture
def manifest(tmp_path, tiny_parents):
    p = tmp_path / "m.yaml"
    p.write_text(MANIFEST.format(a=tiny_parents[0], b=tiny_parents[1]))
    return p


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_minimum_is_the_smallest_budget_the_prediction_fits(manifest, workers):
    plan = load_plan(manifest)
    least, tensor = engine.minimum_budget(plan, workers)
    assert engine.predicted_peak(plan, least, workers) <= least
    assert engine.predicted_peak(plan, least - 1, workers) > least - 1
    assert tensor in {tp.name for tp in plan.tensors}
    # at the minimum every worker holds one row of that tensor's inputs, scratch and staging at least
    tp = next(t for t in plan.tensors if t.name == tensor)
    row = engine._row_elems(tp.shape)
    assert least >= workers * row * (engine._inputs_itemsize(plan, tp) + engine.block_bytes_per_elem(plan, tp))


def test_a_budget_below_the_minimum_is_refused_by_plan_and_merge(capsys, manifest, tmp_path):
    plan = load_plan(manifest)
    least, _ = engine.minimum_budget(plan, engine.worker_count())
    for cmd in (["plan", str(manifest)], ["merge", str(manifest), str(tmp_path / "c"), "--quiet"]):
        assert main([*cmd, "--memory-budget", "1KiB"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "below" in err
        assert engine.human_bytes(least) in err, err
    assert not (tmp_path / "c").exists()
    assert not any(p.name.startswith(".c") for p in tmp_path.iterdir())  # not even a partial child


def test_the_minimum_itself_is_accepted(manifest, tmp_path):
    least, _ = engine.minimum_budget(load_plan(manifest), engine.worker_count())
    report = merge(manifest, tmp_path / "c", memory_budget=least)
    assert report.predicted_peak_bytes <= least
    with pytest.raises(DarwinError, match="below"):
        merge(manifest, tmp_path / "d", memory_budget=least - 1)
