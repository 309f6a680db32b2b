"""Planning: manifest -> Plan, the data every later stage works from.

    types.py     the plan's types (leaf: imports nothing above it)
    merge.py     the merge planner (mergekit semantics)
    breed.py     the breed planner (cross-architecture transplants)
    template.py  a plan whose parameters are knobs that a genome fills (evolution)
    format.py    the plan as `darwin-stream plan` prints it
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from darwin_stream.plan.format import format_plan, human_bytes
from darwin_stream.plan.types import Plan, RowRun, SourceRef, TensorPlan, layer_t, tensor_seed

if TYPE_CHECKING:
    from darwin_stream.manifest import Manifest
    from darwin_stream.sources import Parent

__all__ = ["Plan", "RowRun", "SourceRef", "TensorPlan", "build_plan", "format_plan", "human_bytes", "layer_t", "tensor_seed"]


def build_plan(manifest: Manifest, text: str = "", *, parents: Mapping[str, Parent] | None = None) -> Plan:
    """A manifest's plan: the breed planner for a `breed:` section, the merge planner otherwise."""
    # The planners import the manifest module, pydantic and the method registry: only when planning.
    if manifest.breed is not None:
        from darwin_stream.plan.breed import plan_breed

        return plan_breed(manifest, text)
    from darwin_stream.plan.merge import plan_merge

    return plan_merge(manifest, text, parents=parents)
