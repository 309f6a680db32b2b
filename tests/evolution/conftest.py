"""Three tiny qwen3 checkpoints (a base and two models) and an evolve manifest over them."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "darwin_stream" / "score" / "data"


@pytest.fixture(scope="session")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from darwin_stream.demo import build_model

    root = tmp_path_factory.mktemp("trio")
    return tuple(build_model(root / n, seed=s) for n, s in (("base", 11), ("a", 12), ("b", 13)))


def evolve_yaml(trio, *, genes: str | None = None, search: str = "{popsize: 4, max_generations: 2, sigma0: 0.3}",
                fitness: str | None = None, method: str = "task_arithmetic") -> str:
    base, a, b = trio
    genes = genes or (
        f"    - {{name: a, param: weight, model: {a}, granularity: layer, filter: [self_attn, mlp], bounds: [0, 1.5]}}\n"
        f"    - {{name: b, param: weight, model: {b}, granularity: role, filter: [self_attn, mlp], bounds: [0, 1.5]}}\n")
    fitness = fitness or (f"    tasks: [{DATA / 'capitals_choice.jsonl'}]\n"
                          f"    heldout: [{DATA / 'corpus_perplexity.jsonl'}]\n")
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
            f"dtype: float32\nevolve:\n  genes:\n{genes}  search: {search}\n  fitness:\n{fitness}"
            "  backend: {name: hf, dtype: float32}\n")
