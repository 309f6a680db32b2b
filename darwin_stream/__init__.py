"""darwin-stream: streaming, out-of-core, evolutionary merges of language models.

The library for pipelines (docs/library.md):

    import darwin_stream as ds
    report = ds.merge("slerp.yaml", "out/child")        # MergeReport
    ds.ingest("out/child", "s3://bucket/child.zarr")    # IngestReport
    ds.export("s3://bucket/child.zarr", "out/again")    # ExportReport
    ds.evolve("demo.yaml", "demo.run")                  # EvolveReport

Every failure a caller can cause is a `DarwinError` subclass (darwin_stream.errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from darwin_stream.errors import (
    BudgetError,
    DarwinError,
    DependencyError,
    EvolveError,
    ManifestError,
    OptionError,
    OutputError,
    PlanError,
    ScoreError,
    SourceError,
    StorageError,
    StoreError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from darwin_stream.api import ExportReport, IngestReport, MergeReport, export, ingest, load_plan, merge
    from darwin_stream.evolution import EvolveReport, evolve

__all__ = [
    "BudgetError", "DarwinError", "DependencyError", "EvolveError", "EvolveReport", "ExportReport",
    "IngestReport", "ManifestError", "MergeReport", "OptionError", "OutputError", "PlanError", "ScoreError",
    "SourceError", "StorageError", "StoreError", "evolve", "export", "ingest", "load_plan", "merge",
]
_API = ("ExportReport", "IngestReport", "MergeReport", "export", "ingest", "load_plan", "merge")


def __getattr__(name: str) -> object:
    # Lazy: `import darwin_stream` must not pay for torch and dask until a merge is asked for.
    if name in ("evolve", "EvolveReport"):
        from darwin_stream import evolution as evo

        return getattr(evo, name)
    if name in _API:
        from darwin_stream import api

        return getattr(api, name)
    raise AttributeError(name)
