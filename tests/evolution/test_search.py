"""CMA-ES through cma's ask/tell: bounded, deterministic, replayable, not stopped by tied fitness."""

from __future__ import annotations

import numpy as np
import pytest

from darwin_stream.errors import DarwinError
from darwin_stream.evolution.search import Search


def _search(seed: int = 0) -> Search:
    return Search([0.5] * 3, 0.5, lower=[0, 0, 0], upper=[1.5, 1.5, 1.5], popsize=4, seed=seed)


def _run(s: Search, gens: int, f) -> list[list[tuple[list[float], float]]]:
    out = []
    for _ in range(gens):
        xs = s.ask()
        fs = [f(x) for x in xs]
        s.tell(xs, fs)
        out.append(list(zip(xs, fs, strict=True)))
    return out


def test_same_seed_same_genomes_and_inside_bounds():
    a = _run(_search(), 4, sum)
    b = _run(_search(), 4, sum)
    assert a == b
    assert all(0 <= v <= 1.5 for gen in a for x, _ in gen for v in x)
    assert _run(_search(1), 1, sum) != a[:1]


def test_other_users_of_numpys_global_generator_do_not_shift_the_genomes():
    s1, s2 = _search(), _search()
    x1 = s1.ask()
    np.random.rand(1000)  # a tokenizer or sampler between two asks
    x2 = s2.ask()
    assert x1 == x2


def test_replay_rebuilds_the_state_without_a_pickle():
    s = _search()
    hist = _run(s, 3, lambda x: -sum((v - 1) ** 2 for v in x))
    nxt = s.ask()
    r = _search()
    r.replay(hist)
    assert r.ask() == nxt


def test_replay_refuses_an_edited_history():
    hist = _run(_search(), 2, sum)
    hist[1][0] = ([9.0, 9.0, 9.0], 1.0)
    with pytest.raises(DarwinError, match="does not match"):
        _search().replay(hist)


def test_tied_generations_do_not_stop_the_search():
    """A discrete accuracy often ties a whole generation; cma's tolflatfitness would stop there."""
    s = _search()
    _run(s, 6, lambda x: 0.5)
    assert not s.es.stop()
