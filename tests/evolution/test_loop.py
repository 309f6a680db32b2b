"""The loop's own logic, with fake scorers: the genome cache, and candidates recorded in index order
whatever order a pool of scorers finishes them in."""

from __future__ import annotations

from types import SimpleNamespace

from darwin_stream.evolution.history import RunDir
from darwin_stream.evolution.run import _Loop
from darwin_stream.evolution.scorers import BusyLog, JobResult, LocalPool


class CountingScorer:
    def __init__(self):
        self.loads = 0

    def load(self, child):
        self.loads += 1
        return 0.0

    def score(self, tasks):
        return {"fitness": 0.5, "tasks": {"t": {"score": 0.5}}, "details": [], "seconds": 0.01}


def _loop(tmp_path, pool) -> _Loop:
    tpl = SimpleNamespace(apply=lambda x: x, section=SimpleNamespace(search=None))
    return _Loop(tpl, RunDir(tmp_path), pool, [], None)


def test_a_genome_seen_again_is_served_from_the_cache(tmp_path):
    scorer = CountingScorer()
    loop = _loop(tmp_path, LocalPool(scorer, SimpleNamespace(apply=lambda x: x), {"search": []}))
    stop = {"stop": False}
    assert loop.generation(0, [[0.1, 0.2], [0.1, 0.2]], {}, 10, stop) is None
    assert loop.generation(1, [[0.1, 0.3], [0.1, 0.2]], {}, 10, stop) is None
    assert scorer.loads == 2 and loop.scored == 2
    first, again, other, third = loop.history
    assert not first.cached and again.cached and not other.cached and third.cached
    assert (again.generation, again.index, again.fitness) == (0, 1, first.fitness)
    assert [(c.generation, c.index) for c in RunDir(tmp_path).read_history()] == [(0, 0), (0, 1), (1, 0), (1, 1)]


class ReversedPool:
    """Finishes a generation's jobs last to first, as a pool whose first scorer is slow would."""

    size = 2

    def __init__(self):
        self.busy = BusyLog(2)

    def run(self, jobs, *, stop=lambda: False, started=None):
        for k, job in enumerate(reversed(list(jobs))):
            fit = float(job.child[0])
            yield JobResult(job, {"search": {"fitness": fit, "tasks": {"t": fit}, "seconds": 0.0}}, scorer=k % 2)


def test_candidates_are_recorded_in_index_order_whatever_order_they_finish(tmp_path):
    loop = _loop(tmp_path, ReversedPool())
    xs = [[0.1], [0.2], [0.3], [0.4]]
    assert loop.generation(0, xs, {}, 10, {"stop": False}) is None
    got = [(c.index, c.fitness) for c in RunDir(tmp_path).read_history()]
    assert got == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)]


def test_an_evaluation_cap_cuts_the_generation_short_in_index_order(tmp_path):
    loop = _loop(tmp_path, ReversedPool())
    assert loop.generation(0, [[0.1], [0.2], [0.3], [0.4]], {}, 3, {"stop": False}) is True
    assert [c.index for c in RunDir(tmp_path).read_history()] == [0, 1, 2]


def test_busy_log_utilisation():
    log = BusyLog(2)
    for k, a, b in ((0, 0.0, 4.0), (1, 0.0, 1.0), (1, 1.0, 2.0), (1, 2.0, 3.0)):
        log.add(k, "x", a, b)
    s = log.summary()
    assert s["span_s"] == 4.0 and s["busy_s"] == [4.0, 3.0] and s["utilisation"] == [1.0, 0.75] and s["jobs"] == [1, 3]
