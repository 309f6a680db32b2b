"""The library entry points. The CLI is a thin layer over these same calls."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darwin_stream import engine, identity, outputs
from darwin_stream.errors import DarwinError
from darwin_stream.export import ChildWriter
from darwin_stream.plan import Plan
from darwin_stream.tokenizer import child_tokenizer_files
from darwin_stream.tokenizer.load import TOKENIZER_FILES

DEFAULT_SHARD_SIZE = 5 * 10**9

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class MergeReport:
    out: str
    wall_s: float
    bytes_read: int
    bytes_written: int
    peak_anon_bytes: int  # peak RssAnon of this process during the merge
    baseline_anon_bytes: int  # RssAnon when the merge started (interpreter, torch, plan)
    memory_budget: int
    predicted_peak_bytes: int
    tensors: int
    chunks: int
    resumed_chunks: int
    format: str = "safetensors"
    direct_io: bool = False  # whole pages were written with O_DIRECT (asked for, and the filesystem took it)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_plan(manifest: str | os.PathLike | Plan) -> Plan:
    """A Plan from a manifest path, manifest YAML text, or a Plan (returned as is)."""
    if isinstance(manifest, Plan):
        return manifest
    from darwin_stream.manifest import load_manifest
    from darwin_stream.plan import build_plan

    m, text = load_manifest(manifest)
    return build_plan(m, text)


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def child_config(plan: Plan) -> dict:
    """The config_from parent's config.json, with the plan's overrides and the child's dtype."""
    config = json.loads(json.dumps(engine.get_parent(plan.parents[plan.config_from]).config))
    _deep_update(config, plan.config_overrides)
    if plan.out_dtype:
        name = _TORCH_DTYPE_NAMES[plan.out_dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
        if "torch_dtype" not in config and "dtype" not in config:
            config["dtype"] = name
    return config


def _aux(plan: Plan, key: str) -> dict[str, bytes]:
    return dict(engine.get_parent(plan.parents[key]).read_aux())


def child_files(plan: Plan) -> dict[str, bytes]:
    """Everything but the weights: config, generation config, tokenizer, model card."""
    files: dict[str, bytes] = {}
    files.update({k: v for k, v in _aux(plan, plan.config_from).items() if k == "generation_config.json"})
    tokenizer = _aux(plan, plan.tokenizer_from)
    made = child_tokenizer_files(plan, engine.get_parent)  # the child's own vocabulary or chat template
    skip = ("config.json", "generation_config.json") + (TOKENIZER_FILES if made is not None else ())
    files.update({k: v for k, v in tokenizer.items() if k not in skip})
    files.update(made or {})
    files["config.json"] = (json.dumps(child_config(plan), indent=2) + "\n").encode()
    files["README.md"] = model_card(plan).encode()
    return files


def model_card(plan: Plan) -> str:
    """A README that says how the child was made: the manifest and each parent's lineage."""
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- darwin-stream", "base_model:"]
    lines += [f"- {spec}" for spec in plan.parents.values()]
    lines += ["---", "", "# Merged with darwin-stream", ""]
    methods = sorted({t.method for t in plan.tensors})
    lines += [f"This model was made without training by blending the weights of its parents "
              f"({', '.join(methods)}).", "", "## Parents", ""]
    for key, spec in plan.parents.items():
        cfg = engine.get_parent(spec).config
        arch = ", ".join(cfg.get("architectures", [])) or cfg.get("model_type", "unknown")
        role = []
        if key == plan.config_from:
            role.append("architecture and config")
        if key == plan.tokenizer_from:
            role.append("tokenizer")
        lines.append(f"- `{spec}` ({arch})" + (f": {', '.join(role)}" if role else ""))
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    lines += ["", "## Manifest", "", "```yaml", plan.manifest.rstrip(), "```", ""]
    return "\n".join(lines)


def merge(
    manifest: str | os.PathLike | Plan,
    out: str | os.PathLike,
    *,
    client: Any = None,
    memory_budget: int | None = None,
    device: str | None = None,
    shard_size: int | None = None,
    out_format: str | None = None,
    overwrite: bool = False,
    direct_io: bool | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan, int], None] | None = None,
) -> MergeReport:
    """Merge a manifest into a child checkpoint at `out`; arguments override the manifest's options.

    The child is written under a temporary sibling and renamed to `out` only when complete; an
    interrupted merge of the same plan resumes from its finished chunks.
    """
    start = engine.now()
    with engine.PeakMemory() as mem:
        plan = load_plan(manifest)
        opts = plan.options or {}
        budget = int(memory_budget or opts.get("memory_budget") or engine.DEFAULT_BUDGET)
        device = device or opts.get("device") or "cpu"
        shard_size = int(shard_size or opts.get("shard_size") or DEFAULT_SHARD_SIZE)
        out_format = out_format or opts.get("format") or "safetensors"
        if out_format not in ("safetensors", "zarr"):
            raise DarwinError(f"format: expected safetensors or zarr, got {out_format!r}")
        engine.check_device(device)
        engine.check_budget(plan, budget, engine.worker_count(client))
        paths = outputs.output_paths(out)
        target = paths.final if out_format == "safetensors" else paths.final.parent / f".{paths.final.name}.safetensors"
        _check_outputs(manifest, plan, paths, target)
        if out_format == "zarr" and paths.final.exists() and not overwrite:
            raise DarwinError(f"output {paths.final} already exists (use --overwrite to replace it)")
        direct_io = opts.get("direct_io", True) if direct_io is None else direct_io
        with outputs.lock(paths, out):
            writer = ChildWriter(target, plan, shard_size, overwrite=overwrite or out_format == "zarr",
                                 direct=direct_io, identities=identity.plan_identities(plan, engine.get_parent),
                                 extra_bytes=plan.nbytes if out_format == "zarr" else 0)
            if on_plan:
                on_plan(plan, plan.nbytes)
            stats = engine.run(plan, writer, budget=budget, client=client, device=device, progress=progress)
            for name, data in child_files(plan).items():
                writer.write_file(name, data)
            final = writer.finish()
            if out_format == "zarr":
                final = _to_store(final, paths, overwrite=overwrite)
    return MergeReport(
        out=str(final),
        wall_s=round(engine.now() - start, 3),
        bytes_read=stats.bytes_read,
        bytes_written=writer.layout.nbytes,
        peak_anon_bytes=mem.peak,
        baseline_anon_bytes=mem.baseline,
        memory_budget=budget,
        predicted_peak_bytes=engine.predicted_peak(plan, budget, engine.worker_count(client)),
        tensors=len(plan.tensors),
        chunks=stats.chunks,
        resumed_chunks=stats.skipped_chunks,
        format=out_format,
        direct_io=writer.direct,
        notes=list(plan.notes) + ([writer.restarted] if writer.restarted else []),
    )


def _check_outputs(manifest: str | os.PathLike | Plan, plan: Plan, paths: outputs.OutputPaths, target: Path) -> None:
    """Refuse, before anything is written, a merge that would write any path over one it reads."""
    writes = paths.all() + (outputs.output_paths(target).all() if target != paths.final else [])
    inputs = identity.plan_locations(plan, engine.get_parent)
    if isinstance(manifest, os.PathLike) or (isinstance(manifest, str) and "\n" not in manifest and os.path.isfile(manifest)):
        inputs.add(os.fspath(manifest))  # `merge m.yaml m.yaml --overwrite` would delete the manifest
    outputs.check_not_input(writes, inputs)


def _to_store(child_dir: Path, out: outputs.OutputPaths, *, overwrite: bool) -> Path:
    """A --format zarr child: the safetensors child, copied into a zarr store, then removed.

    The store is built in `.OUT.partial`; one left there by a killed run (of this manifest or
    another) is removed first, so that none of its arrays can survive into this child.
    """
    import shutil

    from darwin_stream import store

    tmp = out.tmp
    if store.is_store(tmp):
        outputs.remove(tmp)
    else:
        outputs.clear_temporary(tmp)  # refuses a directory that is not ours
    store.ingest(str(child_dir), str(tmp), mode="copy")
    if out.final.exists() or out.final.is_symlink():
        if not overwrite:
            raise DarwinError(f"output {out.final} already exists (use --overwrite to replace it)")
        outputs.remove(out.old)
        out.final.rename(out.old)
        tmp.rename(out.final)
        outputs.remove(out.old)
    else:
        tmp.rename(out.final)
    shutil.rmtree(child_dir)
    return out.final
