"""darwin-stream: streaming, out-of-core, evolutionary merges of language models."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from darwin_stream.api import MergeReport, load_plan, merge
    from darwin_stream.evolution import EvolveReport, evolve

__all__ = ["EvolveReport", "MergeReport", "evolve", "load_plan", "merge"]


def __getattr__(name: str):
    # Lazy: `import darwin_stream` must not pay for torch and dask until a merge is asked for.
    if name in ("evolve", "EvolveReport"):
        from darwin_stream import evolution as evo

        return getattr(evo, name)
    if name in __all__:
        from darwin_stream import api

        return getattr(api, name)
    raise AttributeError(name)
