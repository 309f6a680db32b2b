"""Evolution: CMA-ES over a genome that fills a template plan, scored in a live engine.

    from darwin_stream.evolution import evolve
    report = evolve("manifests/demo.yaml", "demo.run")   # EvolveReport; resume=True continues a run

plan/template.py (genes -> template plan), search.py (cma ask/tell, replay), history.py (the run directory),
fitness.py (scorer, subset), report.py (plots, card), run.py (the loop), scorers.py (the pool of scorers,
one in process), dask_scorers.py (N scorers on dask.distributed), cli.py (the command).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from darwin_stream.evolution.report import EvolveReport
    from darwin_stream.evolution.run import evolve

__all__ = ["EvolveReport", "evolve"]


def __getattr__(name: str):
    # Lazy: building the CLI's parser must not import cma, torch or matplotlib.
    if name == "evolve":
        from darwin_stream.evolution.run import evolve

        return evolve
    if name == "EvolveReport":
        from darwin_stream.evolution.report import EvolveReport

        return EvolveReport
    raise AttributeError(name)
