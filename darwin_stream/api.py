"""The library entry points: `merge`, `ingest`, `export` (and `evolve`, in evolution/run.py).

The CLI is a thin layer over these same calls. Each returns a report dataclass (what a pipeline
logs: where the output went, bytes, tensors, wall time, peak private memory, notes) and raises only
`errors.DarwinError` subclasses; docs/library.md has one runnable example per call.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from darwin_stream import engine, identity, object_sink, outputs, pool, storage
from darwin_stream.child_writer import ChildWriter, layout
from darwin_stream.edge import at_edge
from darwin_stream.errors import OptionError, OutputError
from darwin_stream.manifest import parse_size
from darwin_stream.plan import Plan, human_bytes
from darwin_stream.sink import ChildSink
from darwin_stream.tokenizer import child_tokenizer_files
from darwin_stream.tokenizer.load import TOKENIZER_FILES

DEFAULT_SHARD_SIZE = 5 * 10**9

if TYPE_CHECKING:
    from distributed import Client

    from darwin_stream.sources import Parent

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class MergeReport:
    """What `merge` did: the child's location, bytes moved, tensors, time and memory, notes."""

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
    uploads: dict[str, int] | None = None  # a child in a bucket: object_sink.UploadStats
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@at_edge("plan")
def load_plan(manifest: str | os.PathLike | Plan, *, storage_options: dict | None = None) -> Plan:
    """A Plan from a manifest path, manifest YAML text, or a Plan (returned as is).

    URL parents are opened with `storage_options` over the manifest's darwin.storage_options.
    Raises ManifestError (the YAML), SourceError (a parent) or PlanError (the two together).
    """
    if isinstance(manifest, Plan):
        return manifest
    from darwin_stream.manifest import load_manifest
    from darwin_stream.plan import build_plan

    m, text = load_manifest(manifest)
    with pool.url_options(storage.combine(storage.from_manifest_text(text), storage_options)):
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
    lines += ["", "## Manifest", "", "```yaml", storage.redact(plan.manifest).rstrip(), "```", ""]
    return "\n".join(lines)


@at_edge("merge")
def merge(
    manifest: str | os.PathLike | Plan,
    out: str | os.PathLike,
    *,
    client: Client | None = None,
    memory_budget: int | str | None = None,
    device: str | None = None,
    shard_size: int | str | None = None,
    out_format: Literal["safetensors", "zarr"] | None = None,
    overwrite: bool = False,
    direct_io: bool | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan, int], None] | None = None,
    storage_options: dict | None = None,
) -> MergeReport:
    """Merge a manifest into a child checkpoint at `out`; arguments override the manifest's options.

    The child is written under a temporary sibling and renamed to `out` only when complete; an
    interrupted merge of the same plan resumes from its finished chunks. An `s3://bucket/prefix`
    output is uploaded straight into the bucket (`object_sink`), with `storage_options` over the
    manifest's `darwin.storage_options` over fsspec's configuration (`storage`).

    Args:
        manifest: a manifest path, its YAML text, or a Plan from `load_plan`.
        out: the child's directory (or zarr store, with out_format="zarr").
        client: a dask.distributed Client to run the graph on; None runs on local threads.
        memory_budget: bytes the merge may hold beyond its baseline (default 1 GiB); an int or "256MiB".
        device: "cpu" or "cuda[:N]" for the blend.
        shard_size: the largest safetensors shard, in bytes or "2GB" (default 5 GB).
        out_format: "safetensors" (default) or "zarr".
        overwrite: replace an existing `out` (only once the new child is complete).
        direct_io: write whole pages with O_DIRECT (default True where the filesystem allows).
        progress: called with the bytes of each finished chunk.
        on_plan: called once with the plan and its bytes, before the first write.
        storage_options: fsspec options for an object-store `out` and URL parents (endpoint_url, key, secret...);
            never written into the child's model card.

    Returns:
        A MergeReport.

    Raises:
        ManifestError, SourceError, PlanError: the manifest, a parent, or their combination.
        OptionError, BudgetError: a run option, or a memory budget below the plan's minimum.
        OutputError: `out` exists, is or holds a parent, is locked, or lacks room.
        StorageError: an OSError or an object-store error while reading or writing.
    """
    start = engine.now()
    with engine.PeakMemory() as mem, pool.session(), contextlib.ExitStack() as scope:  # each parent opened once
        plan = load_plan(manifest, storage_options=storage_options)
        # URL parents and a URL child: fsspec's config < the manifest's < the argument's (storage.py)
        storage_options = storage.combine(storage.from_manifest_text(plan.manifest), storage_options)
        scope.enter_context(pool.url_options(storage_options))
        opts = plan.options or {}
        budget = _size("memory_budget", memory_budget or opts.get("memory_budget") or engine.DEFAULT_BUDGET)
        device = device or opts.get("device") or "cpu"
        shard_size = _size("shard_size", shard_size or opts.get("shard_size") or DEFAULT_SHARD_SIZE)
        out_format = out_format or opts.get("format") or "safetensors"
        if out_format not in ("safetensors", "zarr"):
            raise OptionError(f"format: expected safetensors or zarr, got {out_format!r}")
        engine.check_device(device)
        if object_sink.is_url(out):
            run = _BucketRun(plan, os.fspath(out), client=client, budget=budget, device=device, shard_size=shard_size,
                             storage_options=storage_options)
            return run.merge(out_format, overwrite=overwrite, direct_io=direct_io, progress=progress,
                             on_plan=on_plan, start=start, mem=mem)
        workers = engine.worker_count(client)
        engine.check_budget(plan, budget, workers)
        paths = outputs.output_paths(out)
        _check_outputs(manifest, plan, paths)
        direct_io = opts.get("direct_io", True) if direct_io is None else direct_io
        with outputs.lock(paths, out):
            writer = _local_sink(plan, out, out_format, workers, budget=budget, shard_size=shard_size,
                                 overwrite=overwrite, direct_io=direct_io)
            if on_plan:
                on_plan(plan, plan.nbytes)
            stats = engine.run(plan, writer, budget=budget, client=client, device=device, progress=progress)
            for name, data in child_files(plan).items():
                writer.write_file(name, data)
            final = writer.finish()
        predicted = engine.predicted_peak(plan, budget, engine.worker_count(client))  # reads parents' dtypes
    return MergeReport(
        out=str(final),
        wall_s=round(engine.now() - start, 3),
        bytes_read=stats.bytes_read,
        bytes_written=writer.layout.nbytes if out_format == "safetensors" else plan.nbytes,
        peak_anon_bytes=mem.peak,
        baseline_anon_bytes=mem.baseline,
        memory_budget=budget,
        predicted_peak_bytes=predicted,
        tensors=len(plan.tensors),
        chunks=stats.chunks,
        resumed_chunks=stats.skipped_chunks,
        format=out_format,
        direct_io=writer.direct,
        notes=list(plan.notes) + ([writer.restarted] if writer.restarted else []),
    )


def _size(name: str, v: int | str) -> int:
    """A size option as the manifest writes it (1GiB, 5GB) or bytes; anything else is an OptionError."""
    try:
        return parse_size(v)
    except ValueError as e:
        raise OptionError(f"{name}: {e}") from None


def _check_outputs(manifest: str | os.PathLike | Plan, plan: Plan, paths: outputs.OutputPaths) -> None:
    """Refuse, before anything is written, a merge that would write any path over one it reads."""
    inputs = identity.plan_locations(plan, engine.get_parent)
    if isinstance(manifest, os.PathLike) or (isinstance(manifest, str) and "\n" not in manifest and os.path.isfile(manifest)):
        inputs.add(os.fspath(manifest))  # `merge m.yaml m.yaml --overwrite` would delete the manifest
    outputs.check_not_input(paths.all(), inputs)


def _local_sink(plan: Plan, out: str | os.PathLike, out_format: str, workers: int, *, budget: int, shard_size: int,
                overwrite: bool, direct_io: bool) -> ChildSink:
    """The writer of a local child: `ChildWriter` (safetensors), or `zarr_sink.LocalZarrSink`, whose
    chunks are the tasks' rows written in place (no safetensors copy staged first)."""
    ids = identity.plan_identities(plan, engine.get_parent)
    if out_format == "safetensors":
        return ChildWriter(out, plan, shard_size, overwrite=overwrite, direct=direct_io, identities=ids)
    from darwin_stream import zarr_sink  # zarr's store layout: only for a zarr child

    return zarr_sink.LocalZarrSink(out, plan, zarr_sink.task_rows(plan, budget, workers), overwrite=overwrite,
                                   identities=ids)


@dataclass
class IngestReport:
    """What `ingest` did: the store's location and mode, the parent's tensors and bytes, time, memory."""

    out: str  # the store: a local path or an fsspec URL
    mode: Literal["reference", "copy"]
    source: str  # the parent's spec
    tensors: int
    bytes: int  # the parent's tensor bytes
    store_bytes: int  # bytes written to the store by this call (reference mode: the JSON file)
    wall_s: float
    peak_anon_bytes: int
    baseline_anon_bytes: int
    resumed_bytes: int = 0  # copy mode: bytes an interrupted ingest had already copied and verified
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What `export` did: the checkpoint's directory, its tensors, bytes and shards, time, memory."""

    out: str
    tensors: int
    bytes: int
    shards: int
    source_shards: int | None  # the store's parent's shard count, when that parent is still there
    wall_s: float
    peak_anon_bytes: int
    baseline_anon_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@at_edge("ingest")
def ingest(
    source: str | os.PathLike | Parent,
    store: str | os.PathLike,
    *,
    mode: Literal["reference", "copy"] | None = None,
    chunk_bytes: int | None = None,
    shard_bytes: int | None = None,
    compressor: Literal["zstd"] | None = None,
    checksum: bool = True,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Turn a parent (local directory, hub id, URL) into a zarr layer store at `store` (a path or URL).

    Args:
        source: the parent, as a manifest's `model:` would name it.
        store: where the store goes; a URL (s3://...) for an object store.
        mode: "reference" (one JSON file pointing into the shards, nothing copied) or "copy";
            None picks reference for local safetensors parents and copy otherwise.
        chunk_bytes, shard_bytes: the zarr chunk and shard sizes (defaults: store.DEFAULT_*).
        compressor: "zstd" to compress a copy store's chunks.
        checksum: hash every tensor (reference mode); False makes the cost independent of the bytes.
        storage_options: fsspec options for URL parents and stores (endpoint_url, key, secret...).
        progress: called with the bytes just processed.

    Returns:
        An IngestReport.

    Raises:
        SourceError: the parent cannot be opened. StoreError: a bad mode or option, or `store` is
        someone else's. OutputError: `store` is or holds the parent. StorageError: an I/O failure.
    """
    from darwin_stream import store as zstore  # zarr and fsspec: only for the calls that need them

    kwargs: dict[str, Any] = {}
    if chunk_bytes is not None:
        kwargs["chunk_bytes"] = chunk_bytes
    if shard_bytes is not None:
        kwargs["shard_bytes"] = shard_bytes
    start = engine.now()
    with engine.PeakMemory() as mem:
        r = zstore.ingest(source, store, mode, compressor=compressor, checksum=checksum, progress=progress,
                          storage_options=storage_options, **kwargs)
    return IngestReport(out=os.fspath(store), mode=r["mode"], source=str(r.get("source", source)), tensors=r["tensors"],
                        bytes=r["bytes"], store_bytes=int(r.get("store_bytes", r.get("bytes_written", 0))),
                        resumed_bytes=int(r.get("bytes_skipped", 0)),
                        wall_s=round(engine.now() - start, 3), peak_anon_bytes=mem.peak,
                        baseline_anon_bytes=mem.baseline, notes=list(r.get("notes", [])))


@at_edge("export")
def export(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write a zarr layer store back out as a safetensors checkpoint directory, bit for bit.

    Args:
        store: a store made by `ingest` (either mode), a path or URL.
        out: the checkpoint directory; it must not exist or be empty unless `overwrite`.
        shard_size: the largest shard in bytes (default 5 GB, Hugging Face's greedy sharding).
        overwrite: replace `out`, only once the new checkpoint is complete.
        progress: called with the bytes just written.

    Returns:
        An ExportReport.

    Raises:
        StoreError: `store` is missing, incomplete or corrupt, or `out` is occupied.
        OutputError: `out` is or holds an input. StorageError: an I/O failure.
    """
    from darwin_stream import store_cli
    from darwin_stream.store import DEFAULT_SHARD_SIZE

    start = engine.now()
    with engine.PeakMemory() as mem:
        r = store_cli.export(os.fspath(store), os.fspath(out), shard_size=shard_size or DEFAULT_SHARD_SIZE,
                             overwrite=overwrite, progress=progress)
    return ExportReport(out=str(r["out_dir"]), tensors=r["tensors"], bytes=r["bytes"], shards=r["shards"],
                        source_shards=r.get("source_shards"), wall_s=round(engine.now() - start, 3),
                        peak_anon_bytes=mem.peak, baseline_anon_bytes=mem.baseline, notes=list(r.get("notes", [])))


@dataclass
class _BucketRun:
    """A merge whose child goes into a bucket: `object_sink.ObjectSink`, or for --format zarr
    `zarr_sink.ZarrSink` (one chunk object per task, the store's root written last)."""

    plan: Plan
    out: str
    client: Any
    budget: int
    device: str
    shard_size: int
    storage_options: dict

    def merge(self, out_format: str, *, overwrite: bool, direct_io: bool | None, progress: Callable[[int], None] | None,
              on_plan: Callable[[Plan, int], None] | None, start: float, mem: engine.PeakMemory) -> MergeReport:
        from darwin_stream.child_marker import partial_prefix

        plan, workers = self.plan, engine.worker_count(self.client)
        outputs.check_not_input([self.out, partial_prefix(self.out)], identity.plan_locations(plan, engine.get_parent))
        if out_format == "zarr":
            return self._to_zarr(overwrite=overwrite, progress=progress, on_plan=on_plan, start=start, mem=mem)
        part = object_sink.part_bytes(layout(plan, self.shard_size))
        cluster = self.client is not None  # workers upload their own parts, shared ones go as fragments
        reserve = object_sink.waiting_bytes(part, workers, distributed=cluster)
        budget = self._merge_budget(reserve, part, workers)
        sink = object_sink.ObjectSink(self.out, plan, self.shard_size, overwrite=overwrite, part_size=part,
                                      workers=workers, identities=identity.plan_identities(plan, engine.get_parent),
                                      storage_options=self.storage_options, distributed=cluster)
        if on_plan:
            on_plan(plan, plan.nbytes)
        try:
            stats = engine.run(plan, sink, budget=budget, client=self.client, device=self.device, progress=progress)
        finally:
            if cluster:  # what each worker's copy of the sink uploaded
                sink.absorb(self.client.run(object_sink.take_stats, sink.run_id).values())
        for name, data in child_files(plan).items():
            sink.write_file(name, data)
        final = sink.finish()
        notes = [sink.restarted] if sink.restarted else []
        if sink.stats.spilled_bytes and not cluster:  # the tasks ran further out of order than the reserve allows for
            notes.append(f"{human_bytes(sink.stats.spilled_bytes)} of parts waiting to upload did not fit in the "
                         f"{human_bytes(reserve)} set aside for them, and went through the bucket instead")
        elif sink.stats.spilled_bytes:
            notes.append(f"{human_bytes(sink.stats.spilled_bytes)} of parts shared by tasks went through the bucket "
                         "as fragments (the cluster's workers share no memory), read back to upload those parts")
        return self._report(final, stats, sink.layout.nbytes, start=start, mem=mem, fmt="safetensors",
                            predicted=engine.predicted_peak(plan, budget, workers) + reserve, notes=notes,
                            uploads=sink.stats.to_dict())

    def _merge_budget(self, reserve: int, part: int, workers: int) -> int:
        """What is left of the budget for the merge's tasks once waiting parts are set aside."""
        least, tensor = engine.minimum_budget(self.plan, workers)
        if self.budget - reserve < least:
            need = least + reserve
            raise OutputError(
                f"memory budget {human_bytes(self.budget)} is below the {human_bytes(need)} a child in a bucket needs "
                f"with {workers} worker(s): {human_bytes(reserve)} for {reserve // part} parts of {human_bytes(part)} "
                f"waiting to upload, and {human_bytes(least)} for the merge (one row of {tensor}); "
                f"give --memory-budget {-(-need // 1024)}KiB or more")
        return self.budget - reserve

    def _to_zarr(self, *, overwrite: bool, progress: Callable[[int], None] | None,
                 on_plan: Callable[[Plan, int], None] | None, start: float, mem: engine.PeakMemory) -> MergeReport:
        """--format zarr into a bucket: `zarr_sink.ZarrSink` puts each task's rows as one chunk
        object (no local copy of the child), the metadata after the last chunk, the root last."""
        from darwin_stream import zarr_sink  # zarr's store layout: only for a zarr child

        plan, workers = self.plan, engine.worker_count(self.client)
        part = zarr_sink.part_bytes(plan)
        reserve = object_sink.waiting_bytes(part, workers, distributed=True)  # a part filling, one going out
        budget = self._merge_budget(reserve, part, workers)
        cluster = self.client is not None
        sink = zarr_sink.ZarrSink(self.out, plan, zarr_sink.task_rows(plan, budget, workers), overwrite=overwrite,
                                  identities=identity.plan_identities(plan, engine.get_parent), part_size=part,
                                  storage_options=self.storage_options, distributed=cluster)
        if on_plan:
            on_plan(plan, plan.nbytes)
        try:
            stats = engine.run(plan, sink, budget=budget, client=self.client, device=self.device, progress=progress)
        finally:
            if cluster:  # what each worker's copy of the sink uploaded, and its chunks' digests
                sink.absorb(self.client.run(object_sink.take_stats, sink.run_id).values(),
                            self.client.run(zarr_sink.take_digests, sink.run_id).values())
        for name, data in child_files(plan).items():
            sink.write_file(name, data)
        final = sink.finish()
        return self._report(final, stats, plan.nbytes, start=start, mem=mem, fmt="zarr",
                            predicted=engine.predicted_peak(plan, budget, workers) + reserve,
                            notes=[sink.restarted] if sink.restarted else [], uploads=sink.stats.to_dict())

    def _report(self, final: str, stats: engine.RunStats, nbytes: int, *, start: float, mem: engine.PeakMemory,
                fmt: str, predicted: int, notes: list[str], uploads: dict | None) -> MergeReport:
        mem.peak = max(mem.peak, engine.rss_anon())
        return MergeReport(out=final, wall_s=round(engine.now() - start, 3), bytes_read=stats.bytes_read,
                           bytes_written=nbytes, peak_anon_bytes=mem.peak, baseline_anon_bytes=mem.baseline,
                           memory_budget=self.budget, predicted_peak_bytes=predicted, tensors=len(self.plan.tensors),
                           chunks=stats.chunks, resumed_chunks=stats.skipped_chunks, format=fmt, direct_io=False,
                           notes=list(self.plan.notes) + notes, uploads=uploads)
