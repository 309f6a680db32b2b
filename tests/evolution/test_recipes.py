"""The two reference recipes, on tiny real-architecture stand-ins with the repo ids replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from darwin_stream.manifest import parse_manifest
from darwin_stream.plan import build_plan
from darwin_stream.plan.template import Template
from tests.helpers import DATA

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def _stand_in(name: str, swaps: dict[str, str]) -> str:
    text = (MANIFESTS / name).read_text()
    for old, new in swaps.items():
        text = text.replace(old, new)
    return text


def test_instruct_thinking_genome_is_per_layer_and_role(tiny_parents):
    father, mother = tiny_parents
    text = _stand_in("evolve-instruct-thinking.yaml", {
        "Qwen/Qwen3-4B-Instruct-2507": str(father), "Qwen/Qwen3-4B-Thinking-2507": str(mother)})
    m = parse_manifest(text)
    tpl = Template(build_plan(m, text), m)
    assert tpl.dim == 2 * 4 + 2  # per layer for each parent (both roles share one value list), plus the rest
    assert m.evolve.backend.name == "vllm"


@pytest.mark.slow
def test_genesis_evolves_breed_genes_end_to_end(tmp_path):
    from darwin_stream.demo import build_model
    from darwin_stream.evolution import evolve

    father = build_model(tmp_path / "gemma4", "gemma4", seed=1)
    mother = build_model(tmp_path / "qwen35", "qwen3_5", seed=2)
    text = _stand_in("evolve-genesis.yaml", {
        "google/gemma-4-E4B-it": str(father), "Qwen/Qwen3.5-4B": str(mother),
        "tasks/validation.jsonl": str(DATA / "capitals_choice.jsonl"),
        "tasks/heldout.jsonl": str(DATA / "corpus_perplexity.jsonl"),
        "popsize: 10, sigma0: 0.15, max_generations: 20": "popsize: 3, sigma0: 0.3, max_generations: 2",
        "dtype: bfloat16}": "dtype: float32}", "subset: {items: 100, rescore_top: 5}": "subset: {items: 4, rescore_top: 2}"})
    m = parse_manifest(text)
    tpl = Template(build_plan(m, text), m)
    assert tpl.dim == 6  # the tiny father's layer count
    p = tmp_path / "genesis.yaml"
    p.write_text(text)
    report = evolve(p, tmp_path / "run")
    assert report.evaluations == 6
    assert set(report.heldout["parents"]) == {str(father), str(mother)}
    assert Path(report.child_dir, "model.safetensors").exists() or list(Path(report.child_dir).glob("*.safetensors"))
