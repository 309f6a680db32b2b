"""Cross-architecture breeding: the manifest's `breed:` section and its plan (issue 4; stub)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class BreedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    father: str
    mother: str
    keep: str = "father"
    blend: dict[str, dict[str, Any]] = {}
    layer_map: str | list[int] = "linear"


def plan_breed(manifest: Any, text: str = "") -> Any:
    """Manifest with a breed section -> plan.Plan."""
    raise NotImplementedError("breeding is not implemented yet")
