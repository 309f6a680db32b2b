"""The loop's own logic, with a counting fake scorer: a genome seen again is not scored again."""

from __future__ import annotations

from types import SimpleNamespace

from darwin_stream.evolution.history import RunDir
from darwin_stream.evolution.run import _Loop


class CountingScorer:
    def __init__(self):
        self.loads = 0

    def load(self, child):
        self.loads += 1
        return 0.0

    def score(self, tasks):
        return {"fitness": 0.5, "tasks": {"t": {"score": 0.5}}, "details": [], "seconds": 0.01}


def test_a_genome_seen_again_is_served_from_the_cache(tmp_path):
    tpl = SimpleNamespace(apply=lambda x: x, section=SimpleNamespace(search=None))
    scorer = CountingScorer()
    loop = _Loop(tpl, RunDir(tmp_path), scorer, [], [], None)
    first = loop.evaluate(0, 0, [0.1, 0.2])
    again = loop.evaluate(1, 3, [0.1, 0.2])
    other = loop.evaluate(1, 4, [0.1, 0.3])
    assert scorer.loads == 2 and loop.scored == 2
    assert not first.cached and again.cached and not other.cached
    assert (again.generation, again.index, again.fitness) == (1, 3, first.fitness)
