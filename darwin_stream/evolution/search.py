"""CMA-ES through the `cma` package's ask/tell interface, made deterministic and replayable.

Why these options:
- bounds go through cma's own BoundTransform (`bounds` option): `ask()` returns genomes inside them,
  and the ES learns in the untransformed space; clipping by hand would bias the covariance.
- Accuracy on a small item set is discrete and candidates often tie, so the stops tuned for
  continuous objectives would end a run early: `tolflatfitness` stops a run whose generations tie
  (measured on the demo: 3 tied generations in a row are common in the first 5). They are disabled;
  the loop enforces its own caps (cma checks `maxfevals` only per generation).
- cma draws from numpy's global generator. The search keeps its own generator state and swaps it in
  around every `ask`, so nothing else in the process (a tokenizer, a sampler) can shift the
  genomes, and a replay of the same tells asks the same genomes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from darwin_stream.errors import EvolveError

_NO_STOP = 10**9


class Search:
    def __init__(self, x0: Sequence[float], sigma0: float, *, lower: Sequence[float], upper: Sequence[float],
                 popsize: int, seed: int):
        import cma

        self.popsize = popsize
        saved = np.random.get_state()
        opts = {
            "bounds": [list(lower), list(upper)],
            "popsize": popsize,
            # cma treats seed 0 as "draw a random seed"; the manifest's seed 0 must be reproducible too.
            "seed": int(seed) + 1,
            "verbose": -9, "verb_disp": 0, "verb_log": 0,
            "tolflatfitness": _NO_STOP, "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolstagnation": _NO_STOP,
            "maxiter": _NO_STOP, "maxfevals": _NO_STOP,
        }
        try:
            self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)
        self.generation = 0

    def ask(self) -> list[list[float]]:
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            xs = self.es.ask()
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)
        return [[float(v) for v in x] for x in xs]

    def tell(self, genomes: list[list[float]], fitness: list[float]) -> None:
        """Fitness is higher-is-better; cma minimises."""
        self.es.tell([np.asarray(g) for g in genomes], [-f for f in fitness])
        self.generation += 1

    def replay(self, generations: list[list[tuple[list[float], float]]]) -> None:
        """Rebuild the state from recorded generations: ask, check the genomes match, tell the fitness."""
        for g, recorded in enumerate(generations):
            asked = self.ask()
            got = [r[0] for r in recorded]
            if asked != got:
                raise EvolveError(
                    f"cannot resume: generation {g} of the history does not match what the search asks "
                    "(the history was edited, or was written by another version); start a new --run-dir")
            self.tell(asked, [r[1] for r in recorded])
