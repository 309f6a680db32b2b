"""The same loop with candidates bred in place inside a live vLLM engine."""

from __future__ import annotations

import pytest

from darwin_stream.evolution import evolve
from darwin_stream.evolution.history import RunDir
from tests.helpers import evolve_yaml

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_evolve_breeds_candidates_in_vllm(trio, tmp_path):
    pytest.importorskip("vllm")
    p = tmp_path / "v.yaml"
    p.write_text(evolve_yaml(trio, search="{popsize: 2, max_generations: 2, sigma0: 0.3}")
                 .replace("{name: hf, dtype: float32}", "{name: vllm, dtype: float32}"))
    report = evolve(p, tmp_path / "run")
    h = RunDir(tmp_path / "run").read_history()
    assert report.evaluations == 4 and len(h) == 4
    assert all(c.breed_s > 0 for c in h if not c.cached)
    # The winner was scored again after the search: the same plan bred again gives the same fitness.
    best = max(h, key=lambda c: c.fitness)
    assert report.fitness["child"] == pytest.approx(best.fitness, abs=1e-9)
