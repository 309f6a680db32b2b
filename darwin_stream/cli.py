"""darwin-stream makes new language models out of existing ones, without training.

It blends the weights of parent checkpoints tensor by tensor (mergekit's methods and YAML), streaming
row chunks so that a merge stays within a fixed memory budget, breeds across architectures, and
scores the children. A manifest is a YAML file that names the parents, the method and its
parameters (docs/manifest.md); `darwin-stream methods` lists the methods.
"""

# The command line only parses, calls the library (darwin_stream.api and friends) and prints.

from __future__ import annotations

import argparse
import json
import os
import sys

from darwin_stream.errors import DarwinError, OptionError


def parse_size(text: str) -> int:
    """argparse's view of manifest.parse_size: one size syntax for YAML and flags."""
    from darwin_stream.manifest import parse_size as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _human(n: float) -> str:
    from darwin_stream.plan import human_bytes

    return human_bytes(n)


class _Bar:
    """A rich progress bar in bytes that appears only once there is work to show.

    It is started by `start(total)` (after planning), so that an input error is the only line the
    user sees; `advance` is the engine's progress callback.
    """

    def __init__(self, label: str, quiet: bool):
        self.label, self.quiet = label, quiet
        self._bar = self._task = None

    def start(self, total: int | None) -> None:
        if self.quiet or self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total)

    def advance(self, n: int) -> None:
        if self._bar is None:
            self.start(None)
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def callback(self):
        return None if self.quiet else self.advance

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- commands ----------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    from darwin_stream import api

    client = _client(args.scheduler)
    with _Bar("merge", args.quiet) as bar:
        report = api.merge(args.manifest, args.out_dir, client=client, memory_budget=args.memory_budget,
                           device=args.device, shard_size=args.shard_size, out_format=args.format,
                           overwrite=args.overwrite, direct_io=False if args.page_cache else None,
                           progress=bar.callback(), storage_options=_storage_options(args),
                           on_plan=lambda plan, nbytes: bar.start(nbytes))
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"child: {report.out} ({report.tensors} tensors, {_human(report.bytes_written)}) in "
              f"{report.wall_s:.2f} s; peak private memory {_human(report.peak_anon_bytes)} "
              f"(budget {_human(report.memory_budget)} above {_human(report.baseline_anon_bytes)} baseline)")
        for note in report.notes:
            print(f"note: {note}")
    return 0


def _storage_options(args: argparse.Namespace) -> dict | None:
    """--storage-options JSON: fsspec options for URL outputs (and an ingest's URL source)."""
    from darwin_stream.storage import parse_json

    return parse_json(args.storage_options) if args.storage_options else None


def _client(address: str | None):
    if not address:
        return None
    from dask.distributed import Client  # optional and heavy: only with --scheduler

    try:
        return Client(address)
    except (ValueError, TypeError, OSError) as e:  # a malformed address, an unknown scheme, no answer
        raise OptionError(f"--scheduler {address}: cannot connect to a dask scheduler ({e})") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from darwin_stream import api, engine
    from darwin_stream.child_writer import layout
    from darwin_stream.plan import format_plan

    plan = api.load_plan(args.manifest)
    budget = args.memory_budget or int(plan.options.get("memory_budget") or engine.DEFAULT_BUDGET)
    workers = engine.worker_count()
    engine.check_budget(plan, budget, workers)
    peak = engine.predicted_peak(plan, budget, workers)
    size = layout(plan, int(args.shard_size or plan.options.get("shard_size") or api.DEFAULT_SHARD_SIZE))
    bucket_peak, part, reserve = _bucket_peak(plan, size, budget, workers)
    if args.json:
        print(json.dumps({"plan": json.loads(plan.to_json()), "child_bytes": size.nbytes,
                          "shards": len(size.shards), "predicted_peak_bytes": peak, "memory_budget": budget,
                          "predicted_peak_bucket_bytes": bucket_peak}))
        return 0
    print(format_plan(plan))
    print(f"output: {len(size.shards)} shard(s), {_human(size.nbytes)} with headers; "
          f"predicted peak memory {_human(peak)} above baseline (budget {_human(budget)}, {workers} workers)")
    if bucket_peak is None:
        print(f"into a bucket (s3://...): the budget is too small once {_human(reserve)} is set aside for parts of "
              f"{_human(part)} waiting to upload")
    else:
        print(f"into a bucket (s3://...): predicted peak memory {_human(bucket_peak)}, of which {_human(reserve)} "
              f"for parts of {_human(part)} waiting to upload")
    for note in plan.notes:
        print(f"note: {note}")
    _print_genome(args.manifest, plan)
    return 0


def _bucket_peak(plan, size, budget: int, workers: int) -> tuple[int | None, int, int]:
    """(predicted peak, part size, bytes set aside for waiting parts) of a merge into a bucket;
    the peak is None when the budget cannot hold both."""
    from darwin_stream import engine, object_sink

    part = object_sink.part_bytes(size)
    reserve = object_sink.waiting_bytes(part, workers)
    if budget - reserve < engine.minimum_budget(plan, workers)[0]:
        return None, part, reserve
    return engine.predicted_peak(plan, budget - reserve, workers) + reserve, part, reserve


def _print_genome(manifest: str, plan) -> None:
    """An evolve manifest's genome: its length and which coordinates each gene holds."""
    from darwin_stream.manifest import load_manifest

    m, _ = load_manifest(manifest)
    if m.evolve is not None:
        from darwin_stream.plan.template import Template

        print(Template(plan, m).format_layout())


def cmd_ingest(args: argparse.Namespace) -> int:
    from darwin_stream import pool, store

    kwargs = {}
    if args.chunk_size:
        kwargs["chunk_bytes"] = args.chunk_size
    if args.zstd:
        kwargs["compressor"] = "zstd"
    opts = _storage_options(args)
    with _Bar("ingest", args.quiet) as bar, pool.session():  # one open parent for the bar and the ingest
        parent = pool.get_parent(args.source, opts if "://" in args.source else None)
        bar.start(sum(t.nbytes for t in parent.tensors.values()))
        report = store.ingest(parent, args.store, mode=args.mode, progress=bar.callback(), storage_options=opts,
                              **kwargs)
    print(json.dumps(report) if args.json else f"store: {args.store} ({report.get('mode', args.mode)} mode)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from darwin_stream import store_cli
    from darwin_stream.store import DEFAULT_SHARD_SIZE

    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    with _Bar("export", args.quiet) as bar:
        report = store_cli.export(args.store, args.out_dir, shard_size=shard_size, overwrite=args.overwrite,
                                  progress=bar.callback(),
                                  on_start=lambda meta: bar.start(store_cli.store_bytes(meta)))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"exported: {report['out_dir']} ({report['tensors']} tensors, {_human(report['bytes'])} in "
          f"{report['shards']} shard(s)) in {report['seconds']:.2f} s")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a tiny base and two skilled parents (kept for the next run), evolve their merge, show the table."""
    from darwin_stream.evolution.cli import Display, print_report
    from darwin_stream.evolution.demo import format_table, run_demo

    quiet = args.quiet or args.json
    if not quiet:
        print(f"building the demo's base and parents in {args.workdir} (kept for the next run) ...", file=sys.stderr)
    display, train = Display(quiet), _TrainBar()
    try:
        result = run_demo(args.workdir, seed=args.seed, progress=display, build_progress=None if quiet else train)
    finally:
        train.close()
        display.close()
    if args.json:
        print_report(result.report, True)
        return 0
    print_report(result.report, False)
    print()
    print(format_table(result))
    return 0


class _TrainBar:
    """One rich bar per training stage of the demo's build (base, A, B)."""

    def __init__(self) -> None:
        self.bar = None
        self.tasks: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.bar is None:
            self.bar = Progress(TextColumn("train {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- parser ------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from darwin_stream import __version__

    try:
        return version("darwin-stream")
    except PackageNotFoundError:  # run from a checkout on PYTHONPATH, not installed
        return __version__


MANIFEST_HELP = "a merge or breed manifest: mergekit-style YAML (docs/manifest.md; examples in manifests/)"
BUDGET_HELP = ("most bytes in flight above the process's baseline, e.g. 256MiB (default: the manifest's "
               "darwin.memory_budget, else 1GiB); a budget below what the plan needs is refused")
SHARD_HELP = "largest output shard, e.g. 2GB (default: the manifest's darwin.shard_size, else 5GB)"
STORAGE_HELP = ("fsspec options for s3:// URLs as a JSON object, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' "
                "(over the manifest's darwin.storage_options and fsspec's own FSSPEC_S3_* configuration; never "
                "written into the child)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="darwin-stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `darwin-stream COMMAND --help` for a command's arguments.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, progress: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print a machine-readable report")
        if progress:
            sp.add_argument("--quiet", action="store_true", help="no progress bar")

    m = sub.add_parser("merge", help="merge a manifest into a child checkpoint",
                       description="Merge the parents a manifest names into a child checkpoint at OUT_DIR. "
                                   "The child appears only when complete; an interrupted merge resumes.")
    m.add_argument("manifest", help=MANIFEST_HELP)
    m.add_argument("out_dir", help="where the child is written (a directory, or a bucket URL such as "
                                   "s3://bucket/child; refused if it exists, unless --overwrite)")
    m.add_argument("--memory-budget", type=parse_size, metavar="SIZE", help=BUDGET_HELP)
    m.add_argument("--shard-size", type=parse_size, metavar="SIZE", help=SHARD_HELP)
    m.add_argument("--device", help="cpu (default) or cuda: where the blend arithmetic runs")
    m.add_argument("--format", choices=["safetensors", "zarr"],
                   help="the child's form: a safetensors checkpoint (default) or a zarr copy store")
    m.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a dask.distributed scheduler (default: threads in this process); "
                        "the memory budget then applies to each worker process")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    m.add_argument("--page-cache", action="store_true",
                   help="write the child through the page cache, leaving it cached for a following load "
                        "(default: O_DIRECT where the filesystem allows it)")
    m.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    common(m)
    m.set_defaults(func=cmd_merge)

    pl = sub.add_parser("plan", help="print what a merge would do; writes nothing",
                        description="Print, per child tensor, what a merge would read and how it would blend "
                                    "it, the output's size and the predicted peak memory. Writes nothing.")
    pl.add_argument("manifest", help=MANIFEST_HELP)
    pl.add_argument("--memory-budget", type=parse_size, metavar="SIZE", help=BUDGET_HELP)
    pl.add_argument("--shard-size", type=parse_size, metavar="SIZE", help=SHARD_HELP)
    common(pl, progress=False)
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("ingest", help="turn a parent into a zarr layer store",
                       description="Turn a parent into a zarr v3 layer store (docs/store.md).")
    i.add_argument("source", help="a parent: checkpoint directory, Hugging Face repo id, fsspec URL or store")
    i.add_argument("store", help="the store to write: a .json file (reference mode) or a directory or URL "
                                 "such as s3://bucket/parent.zarr (copy mode)")
    i.add_argument("--mode", choices=["reference", "copy"],
                   help="reference: zero-copy view of local shards (default for local parents); copy: a real store")
    i.add_argument("--chunk-size", type=parse_size, metavar="SIZE", help="copy mode: bytes per chunk")
    i.add_argument("--zstd", action="store_true", help="copy mode: compress chunks with zstd")
    i.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)
    common(i)
    i.set_defaults(func=cmd_ingest)

    e = sub.add_parser("export", help="write a zarr store back out as a safetensors checkpoint",
                       description="Write a store back out as a safetensors checkpoint: the tensors bit for "
                                   "bit, in shards of at most --shard-size (which may differ from the parent's).")
    e.add_argument("store", help="a store made by `darwin-stream ingest` (either mode)")
    e.add_argument("out_dir", help="where the checkpoint is written (refused if it exists and is not empty, "
                                   "unless --overwrite)")
    e.add_argument("--shard-size", type=parse_size, metavar="SIZE", help="largest output shard (default 5GB)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_DIR, once the new checkpoint is complete")
    common(e)
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="train two tiny skilled parents, evolve their merge, show the held-out table")
    d.add_argument("--workdir", default="demo-out", help="where the models, tasks and runs are built and kept")
    d.add_argument("--seed", type=int, default=0, help="seeds the training data, the models and the search")
    common(d)
    d.set_defaults(func=cmd_demo)

    for name, module, help_ in (("inspect", "darwin_stream.arch.cli", "print a model's layers and roles"),
                                ("score", "darwin_stream.score.cli", "score models on tasks"),
                                ("evolve", "darwin_stream.evolution.cli",
                                 "search a merge's per-layer genome with CMA-ES, scoring children in a live engine"),
                                ("methods", "darwin_stream.methods_cli",
                                 "list the merge methods and their parameters")):
        try:
            mod = __import__(module, fromlist=["configure", "run"])
        except ImportError:
            continue
        sp = sub.add_parser(name, help=help_, description=(mod.__doc__ or "").split("\n\n")[0])
        mod.configure(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Names from untrusted files may hold characters the terminal cannot encode: print them
        # escaped rather than fail while printing the very error that names them.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return int(args.func(args) or 0)
    except DarwinError as e:
        print(f"darwin-stream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("darwin-stream: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except ImportError as e:
        from darwin_stream.hints import missing_dependency

        hint = missing_dependency(e)
        if hint is None:
            raise
        print(f"darwin-stream: error: {hint}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"darwin-stream: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


def _broken_pipe() -> int:
    """The reader of stdout went away (`darwin-stream inspect X | head`): stop quietly.

    Python's own advice (docs, "Note on SIGPIPE"): point stdout at devnull so that the flush at exit
    does not raise again, and exit as a process killed by SIGPIPE would be seen by a shell: 128 + 13.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13


def entry() -> None:
    """The console script: `main`, then exit without tearing the interpreter down.

    Everything a command writes is flushed and fsynced before it returns; what is left is unloading
    torch, dask and zarr, measured at 0.4 s of a 4 s merge. In-process callers use `main`.
    """
    code = main()
    try:
        sys.stdout.flush()  # a short output is still buffered here: its reader may be gone by now
    except BrokenPipeError:
        code = _broken_pipe()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
