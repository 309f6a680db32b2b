"""LoRA adapters applied by rows, as part of the stream: mergekit's `model+adapter` parents.

mergekit merges a `base+lora` reference by loading the whole base model in transformers, running
PEFT's `merge_and_unload`, and saving a merged copy in its cache before the merge starts: a full
model in memory and a full checkpoint on disk per adapter. Here the adapter is applied where rows
are read: rows [r0, r1) of a targeted weight W are `W[r0:r1] + scale * B[r0:r1] @ A` (PEFT's
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA), computed in float32 in row blocks and
rounded once to W's dtype, which is what a merged checkpoint stores. The child never sees the
difference: a LoRA parent is one more `Parent` (sources.LoraParent) whose rows already hold the
adapter.

This module holds the logic (the adapter's config, which tensors it changes, the row arithmetic);
sources.LoraParent holds the reading. A PEFT adapter directory is `adapter_config.json` plus
`adapter_model.safetensors`; DoRA, LoRA biases and non-LoRA PEFT types are refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from darwin_stream.errors import SourceError

CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's wrapper around the base model, in every saved tensor name
# The row block of the float32 arithmetic: 2^18 elements (1 MiB) per temporary, as the engine's
# in-place blocks, so a LoRA parent's extra memory is the rows it returns, not float32 copies of them.
BLOCK_ELEMS = 2**18


@dataclass(frozen=True)
class AdapterConfig:
    """What of adapter_config.json decides the arithmetic."""

    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None

    def scale(self, module: str) -> float:
        """PEFT's scaling for one module: its alpha over its rank (or sqrt(rank), rsLoRA)."""
        r = _pattern(self.rank_pattern, module, self.r)
        alpha = _pattern(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: a key matches a module whose name ends with it at a dot."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_config(config: Any, spec: str) -> AdapterConfig:
    """adapter_config.json (parsed) -> AdapterConfig; what cannot be applied by rows is refused."""
    if not isinstance(config, dict):
        raise SourceError(f"adapter {spec}: {CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise SourceError(f"adapter {spec}: peft_type {kind!r} is not a LoRA (only LORA adapters can be applied)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise SourceError(f"adapter {spec}: {what} ({key}: true) cannot be applied; merge the adapter with PEFT first")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and r > 0) or isinstance(r, bool):
        raise SourceError(f"adapter {spec}: {CONFIG_FILE}: expected a positive integer r, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise SourceError(f"adapter {spec}: {CONFIG_FILE}: expected a number lora_alpha, got {alpha!r}")
    return AdapterConfig(r=r, alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                         fan_in_fan_out=bool(config.get("fan_in_fan_out")),
                         rank_pattern=config.get("rank_pattern") or None, alpha_pattern=config.get("alpha_pattern") or None)


@dataclass(frozen=True)
class Delta:
    """A targeted base weight: W + scale * B @ A (or its transpose, for embeddings and Conv1D)."""

    a: str  # the adapter's tensor names
    b: str
    scale: float
    transposed: bool  # the weight's rows are A's columns: delta = (B @ A).T


@dataclass(frozen=True)
class Replace:
    """A module PEFT saved whole (`modules_to_save`, e.g. a re-trained lm_head): its rows replace the base's."""

    name: str


def plan_adapter(adapter: Mapping[str, tuple[int, ...]], base: Mapping[str, tuple[int, ...]], cfg: AdapterConfig,
                 spec: str) -> dict[str, Delta | Replace]:
    """Base tensor name -> what the adapter does to it, from the adapter's tensor names and shapes.

    Every shape is checked here, before any row is read: A is [r, in] and B [out, r] for a
    weight [out, in] (for an embedding [vocab, dim]: A [r, vocab], B [dim, r]).
    """
    pairs: dict[str, dict[str, str]] = {}
    out: dict[str, Delta | Replace] = {}
    for name in adapter:
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(module, {})[part] = name
            continue
        target = _base_name(name, base, spec)
        if tuple(adapter[name]) != tuple(base[target]):
            raise SourceError(f"adapter {spec}: {name} has shape {list(adapter[name])}, the base's {target} "
                              f"{list(base[target])}")
        out[target] = Replace(name)
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
            (parts.get("lora_A"), parts.get("lora_B"))
        if a is None or b is None:
            raise SourceError(f"adapter {spec}: {module} has only one of its two LoRA matrices")
        target = _base_name(f"{module}.weight", base, spec)
        transposed = embedding or cfg.fan_in_fan_out
        _check_shapes(spec, target, base[target], adapter[a], adapter[b], transposed)
        out[target] = Delta(a=a, b=b, scale=cfg.scale(module.removeprefix(_PREFIX)), transposed=transposed)
    return out


def _base_name(name: str, base: Mapping[str, Any], spec: str) -> str:
    target = name.removeprefix(_PREFIX)
    if target not in base:
        raise SourceError(f"adapter {spec}: {name} changes {target}, which the base model does not have")
    return target


def _check_shapes(spec: str, target: str, w: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...],
                  transposed: bool) -> None:
    rows, cols = (w[0], w[1]) if len(w) == 2 else (None, None)
    ok = len(w) == 2 and len(a) == 2 and len(b) == 2 and a[0] == b[1] and (
        (a[1] == rows and b[0] == cols) if transposed else (b[0] == rows and a[1] == cols))
    if not ok:
        raise SourceError(f"adapter {spec}: LoRA shapes A {list(a)}, B {list(b)} do not fit {target} {list(w)}")


def apply_rows(rows: torch.Tensor, delta: Delta, start: int, read: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Rows [start, start + len(rows)) of W + scale * B @ A, in W's dtype (one rounding).

    `read(name, r0, r1)` reads rows of an adapter tensor (r1 None: all of them). Blocks of rows
    keep the float32 temporaries at BLOCK_ELEMS elements whatever the task's size.
    """
    n, cols = rows.shape
    stop = start + n
    if delta.transposed:  # rows of W are columns of A: delta rows = A[:, rows].T @ B.T
        left = read(delta.a, 0, None)[:, start:stop].float().T
        right = read(delta.b, 0, None).float().T
    else:
        left = read(delta.b, start, stop).float()
        right = read(delta.a, 0, None).float()
    out = torch.empty_like(rows)
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        block = torch.addmm(rows[r0:r1].float(), left[r0:r1], right, alpha=delta.scale)
        out[r0:r1] = block.to(rows.dtype)
    return out
