"""A merge of a model larger than its memory budget stays within that budget.

The bound is the issue's: peak private memory (RssAnon over the process tree) of `merge` at most
`--memory-budget` above that of `plan` on the same manifest (interpreter, torch, dask, the plan).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import peak_private_memory

BUDGET = 8 * 2**20

SLERP = """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: [0.1, 0.9]
dtype: bfloat16
"""


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    dirs = []
    for k in range(2):
        torch.manual_seed(k)
        d = root / f"p{k}"
        d.mkdir()
        tensors = {"model.embed_tokens.weight": torch.randn(8192, 2048).to(torch.bfloat16)}  # 32 MiB
        for i in range(2):
            tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(4096, 1024).to(torch.bfloat16)
            tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(1024).to(torch.bfloat16)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
        dirs.append(d)
    return dirs


@pytest.mark.slow
def test_merge_stays_within_its_budget(big_pair, tmp_path):
    a, b = big_pair
    manifest = tmp_path / "slerp.yaml"
    manifest.write_text(SLERP.format(a=a, b=b))
    parent_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    assert parent_bytes > 4 * BUDGET, "the point is a model larger than the budget"
    peak, baseline = _merge_and_plan_peaks(manifest, tmp_path / "child", BUDGET)
    assert (tmp_path / "child" / "model.safetensors").exists()
    assert peak - baseline <= BUDGET, f"merge peak {peak / 2**20:.1f} MiB, plan {baseline / 2**20:.1f} MiB"


def _merge_and_plan_peaks(manifest, child, budget: int) -> tuple[int, int]:
    """Peak private memory of `merge` and of `plan` (the baseline) on `manifest` under `budget`."""
    cli = [sys.executable, "-m", "darwin_stream.cli"]
    args = ["--memory-budget", str(budget)]
    rc, baseline = peak_private_memory([*cli, "plan", str(manifest), *args])
    assert rc == 0
    rc, peak = peak_private_memory([*cli, "merge", str(manifest), str(child), "--quiet", *args])
    assert rc == 0
    return peak, baseline


SELECTIONS = {
    "ties": "  - model: {b}\n    parameters: {{weight: 0.7, density: 0.4}}\n",
    "dare_linear": "  - model: {b}\n    parameters: {{weight: 0.7, density: 0.4}}\n",
    "della": "  - model: {b}\n    parameters: {{weight: 0.7, density: 0.4, epsilon: 0.1}}\n",
    "sce": "  - model: {b}\n  - model: {a}\nparameters:\n  select_topk: 0.3\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SELECTIONS))
def test_selection_and_random_methods_stay_within_the_budget(big_pair, tmp_path, method):
    """The methods that allocate temporaries per block, at full-size heap blocks (engine.HEAP_BLOCK,
    2^17 elements: a 48 MiB budget leaves each of 2 workers, its two staging buffers set aside, more
    than such a block needs), with the
    statistic passes that ties, della and sce make and the masks dare keeps: their temporaries
    (`temp_bytes`) must be true."""
    from darwin_stream import engine, methods

    a, b = big_pair
    budget = 48 * 2**20
    n = 3 if method == "sce" else 2
    manifest = tmp_path / f"{method}.yaml"
    manifest.write_text(f"merge_method: {method}\nbase_model: {a}\nmodels:\n"
                        + SELECTIONS[method].format(a=a, b=b) + "dtype: bfloat16\n")
    share = engine._share(budget, 2) // 2
    assert share >= engine.HEAP_BLOCK * (4 * n + 4 + methods.get(method).temp_bytes(n)), "blocks at full size"
    peak, baseline = _merge_and_plan_peaks(manifest, tmp_path / "child", budget)
    assert peak - baseline <= budget, f"{method}: merge peak {peak / 2**20:.1f} MiB, plan {baseline / 2**20:.1f} MiB"
