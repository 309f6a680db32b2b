"""Small helpers shared by tests: reading checkpoints and comparing at bf16 resolution."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_all(directory: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bf16_ulp_mismatch(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of elements of `got` more than one bf16 ulp away from `ref` rounded to bf16."""
    a = got.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    b = ref.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    # Map sign-magnitude bit patterns onto a line so that adjacent floats differ by 1.
    a = torch.where(a < 0, -(a & 0x7FFF), a)
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    return ((a - b).abs() > 1).float().mean().item() if a.numel() else 0.0
