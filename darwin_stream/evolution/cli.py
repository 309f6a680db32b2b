"""`darwin-stream evolve MANIFEST [--run-dir DIR] [--resume] [--json]`: a thin layer over `evolve()`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="a merge or breed manifest with an evolve: section (docs/evolution.md)")
    parser.add_argument("--run-dir", help="where the run lives (default: ./<manifest name>.run)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir after a stop or a kill")
    parser.add_argument("--backend", choices=["hf", "vllm"], help="override evolve.backend.name")
    parser.add_argument("--scorers", type=int, metavar="N",
                        help="score N candidates at once, one live engine per dask worker process "
                             "(overrides evolve.backend.scorers; docs/cluster.md)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="score on this dask.distributed cluster, one scorer per worker (docs/cluster.md)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object (the report)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


class Display:
    """A rich progress bar over the evaluations, its text updated per candidate and per generation."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.best = float("-inf")
        self.gen_text = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if event["event"] == "reference":
            Console(stderr=True).print(f"scoring reference: {event['name']}")
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("evolve", total=event["cap"], completed=event["evaluations"] - 1)
        if event["event"] == "candidate":
            self.best = max(self.best, event["fitness"])
            left = event["cap"] - event["evaluations"]
            self.bar.update(self.task, completed=event["evaluations"], description=(
                f"gen {event['generation']} best {self.best:.3f}{self.gen_text} "
                f"{event['seconds']:.2f} s/cand, {left} left"))
        elif event["event"] == "generation":
            self.gen_text = f" mean {event['mean']:.3f}"
            self.bar.console.print(f"generation {event['generation'] + 1}/{event['generations']}: "
                                   f"best {event['best']:.4f}, mean {event['mean']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_report(report: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    h = report.heldout
    print(f"run:      {report.run_dir}")
    print(f"child:    {report.child_dir}")
    print(f"searched: {report.evaluations} candidates in {report.generations} generations; "
          f"best fitness {report.best_fitness:.4f}")
    if h.get("child") is not None:
        print("held-out (never optimised):")
        rows = [("base", h.get("base"))] + [(f"parent {n}", v) for n, v in h["parents"].items()]
        rows += [("50/50 linear", h.get("linear_50_50")), ("evolved child", h["child"])]
        for name, v in rows:
            if v is not None:
                print(f"  {name:<40} {v:.4f}")
    sc = report.scorers or {}
    if sc.get("scorers", 1) > 1:
        use = ", ".join(f"{u:.0%}" for u in sc["utilisation"])
        print(f"scorers:  {sc['scorers']}, busy {use} of {sc['span_s']:.1f} s; jobs {sc['jobs']}")
    if report.subset:
        s = report.subset
        rho = "n/a" if s.get("spearman") is None else f"{s['spearman']:.3f}"
        print(f"subset:   {s['items']} of {s['full_items']} items per candidate; Spearman vs full {rho} "
              f"over {s.get('rescored', 0)} rescored candidates")


def run(args: argparse.Namespace) -> int:
    from darwin_stream.evolution.run import evolve

    display = Display(args.quiet or args.json)
    try:
        report = evolve(args.manifest, args.run_dir, resume=args.resume, progress=display, backend=args.backend,
                        scorers=args.scorers, client=args.scheduler)
    finally:
        display.close()
    if report.interrupted:
        print(f"darwin-stream: stopped after {report.evaluations} candidates; continue with "
              f"darwin-stream evolve {args.manifest} --run-dir {report.run_dir} --resume", file=sys.stderr)
        return 130
    print_report(report, args.json)
    return 0
