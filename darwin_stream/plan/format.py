"""The human-readable plan that `darwin-stream plan` prints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from darwin_stream.plan.types import Plan, SourceRef


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MiB' (binary units: what the memory budget is written in)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _params(d: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={_value(v)}" for k, v in d.items())


def format_plan(plan: Plan) -> str:
    """One line per child tensor (name, shape, dtype, method, sources, parameters), then totals.

    Notes are left to the caller (the CLI prints them after its memory prediction).
    Sources read `parent` when the source tensor has the child's name and `parent:tensor` when it
    does not (slices renumber layers); the base is marked `(base)`. Per-model parameters follow the
    method's own, as `parent{...}`.
    """
    rows = [("tensor", "shape", "dtype", "method", "sources", "parameters")]
    for t in plan.tensors:

        def src(r: SourceRef, tag: str = "", name: str = t.name) -> str:
            gathered = f"[{len(r.rows)} row runs]" if r.rows else ""  # a re-indexed vocabulary
            return (r.parent if r.tensor == name else f"{r.parent}:{r.tensor}") + gathered + tag

        sources = ([src(t.base, "(base)")] if t.base else []) + [src(r) for r in t.models]
        parts = [_params(t.params)] if t.params else []
        parts += [
            f"{r.parent}{{{_params(mp)}}}" for r, mp in zip(t.models, t.model_params, strict=False) if mp
        ]
        rows.append(
            (
                t.name,
                "x".join(map(str, t.shape)) or "scalar",
                t.dtype,
                t.method,
                " ".join(sources),
                " ".join(parts),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    lines = [line.rstrip() for line in lines]
    lines.append("")
    for key, spec in plan.parents.items():
        lines.append(f"parent {key}: {spec}")
    lines.append(f"config and tokenizer from: {plan.config_from}")
    if plan.config_overrides:
        lines.append(f"config overrides: {_params(plan.config_overrides)}")
    if plan.tokenizer:
        tok = plan.tokenizer
        what = f"{tok['source']}, {tok['vocab_size']} tokens" if tok.get("source") else f"{tok['base']}'s"
        if tok.get("rows"):
            what += f" padded to {tok['rows']} rows"
        lines.append(f"tokenizer: {what}" + (", chat template set" if tok.get("chat_template") else ""))
    n = plan.nbytes
    lines.append(f"child: {len(plan.tensors)} tensors, {n:,} bytes ({human_bytes(n)})")
    return "\n".join(lines)
