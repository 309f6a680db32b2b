"""Scorers as a pool: jobs (a child and the task sets to score it on) in, results out as they finish.

The loop (run.py) never talks to a backend directly. It hands a pool a list of jobs and gets each
result back as soon as its scorer is done, in whatever order they finish, and puts them back in
candidate order itself. So one code path serves one scorer in this process (`LocalPool`, which
runs the jobs one after another, exactly as the loop used to) and N scorers on dask.distributed
(`dask_scorers.DaskPool`, one live engine per worker process, a job going to whichever scorer is
free next).

A job names its child as a genome (applied to the run's template by the scorer itself, so a job is
a few hundred bytes however large the model), a reference checkpoint (a path or repo id), or a
plan; and its task sets by name (the pool holds the task lists, sent to each scorer once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from darwin_stream.evolution.fitness import correctness
from darwin_stream.plan import Plan
from darwin_stream.score.tasks import Task

# A test hook, read by the scorer's own process: "LABEL=SECONDS[,LABEL=SECONDS]" makes the scorer sleep
# that long before scoring the job labelled LABEL (tests/evolution/test_parallel.py: one slow candidate).
SLOW_JOB_ENV = "DARWIN_STREAM_TEST_SLOW_JOB"

Started = Callable[["Job"], None]


@dataclass(frozen=True)
class Job:
    label: str  # "g3c5": generation 3, candidate 5; "ref base/fitness"; what a progress line names
    child: list[float] | str | Plan  # a genome (for the template), a checkpoint spec, or a plan
    splits: tuple[str, ...]  # names of task sets held by the pool ("search", "fitness", "heldout")


@dataclass
class JobResult:
    job: Job
    scores: dict[str, dict[str, Any]]  # split -> {"fitness", "tasks", "correct", "seconds"}
    plan_s: float = 0.0
    breed_s: float = 0.0
    scorer: int = 0
    start: float = 0.0  # seconds since the pool opened, on the loop's clock
    end: float = 0.0


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """What the run keeps of one scoring: fitness, per-task scores, per-item correctness, seconds."""
    return {"fitness": result["fitness"], "tasks": {k: v["score"] for k, v in result["tasks"].items()},
            "correct": correctness(result), "seconds": result["seconds"]}


def run_job(scorer: Any, template: Any, tasks: dict[str, list[Task]], job: Job) -> dict[str, Any]:
    """One job on one live scorer: the same function in this process and on a dask worker, so a
    candidate is scored by the same code whichever pool ran it."""
    _maybe_slow(job.label)
    t0 = time.perf_counter()
    child = template.apply(job.child) if isinstance(job.child, list) else job.child
    plan_s = time.perf_counter() - t0
    breed_s = scorer.load(child)
    scores = {name: summarize(scorer.score(tasks[name])) for name in job.splits}
    return {"scores": scores, "plan_s": plan_s, "breed_s": breed_s}


def _maybe_slow(label: str) -> None:
    spec = os.environ.get(SLOW_JOB_ENV)
    if not spec:
        return
    for part in spec.split(","):
        name, _, seconds = part.partition("=")
        if name == label:
            time.sleep(float(seconds))


class ScorerPool(Protocol):
    """N live scorers. `run` yields each job's result as it finishes (not in job order), starts no
    new job once `stop()` is true (the jobs already running still finish and are yielded), and
    calls `started(job)` as each job is handed to a scorer."""

    size: int
    busy: BusyLog

    def set_tasks(self, tasks: dict[str, list[Task]]) -> None: ...

    def run(self, jobs: Sequence[Job], *, stop: Callable[[], bool] = ..., started: Started | None = None,
            ) -> Iterator[JobResult]: ...

    def close(self) -> None: ...


@dataclass
class BusyLog:
    """When each scorer was busy, on the loop's clock: the run's scorer utilisation (report.json)."""

    size: int
    t0: float = field(default_factory=time.perf_counter)
    intervals: list[tuple[int, str, float, float]] = field(default_factory=list)  # scorer, label, start, end

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, scorer: int, label: str, start: float, end: float) -> None:
        self.intervals.append((scorer, label, round(start, 4), round(end, 4)))

    def summary(self) -> dict[str, Any]:
        """Busy seconds and utilisation per scorer over the span from the first job's start to the
        last one's end (the barriers between generations, where cma is told, count as idle)."""
        if not self.intervals:
            return {"scorers": self.size, "span_s": 0.0, "busy_s": [0.0] * self.size,
                    "utilisation": [0.0] * self.size, "jobs": [0] * self.size, "intervals": []}
        lo = min(i[2] for i in self.intervals)
        hi = max(i[3] for i in self.intervals)
        span = max(hi - lo, 1e-9)
        busy = [0.0] * self.size
        jobs = [0] * self.size
        for k, _, a, b in self.intervals:
            busy[k] += b - a
            jobs[k] += 1
        return {"scorers": self.size, "span_s": round(span, 3), "busy_s": [round(b, 3) for b in busy],
                "utilisation": [round(b / span, 3) for b in busy], "jobs": jobs,
                "intervals": [list(i) for i in self.intervals]}


class LocalPool:
    """One scorer in this process; jobs run one at a time, in order, when the loop asks for the next
    result. That is the loop before pools existed: a candidate is scored, recorded and fsynced
    before the next one starts, and a stop takes effect between two candidates."""

    size = 1

    def __init__(self, scorer: Any, template: Any, tasks: dict[str, list[Task]] | None = None):
        self.scorer, self.template = scorer, template
        self.tasks: dict[str, list[Task]] = dict(tasks or {})
        self.busy = BusyLog(1)

    def set_tasks(self, tasks: dict[str, list[Task]]) -> None:
        self.tasks.update(tasks)

    def run(self, jobs: Iterable[Job], *, stop: Callable[[], bool] = lambda: False,
            started: Started | None = None) -> Iterator[JobResult]:
        for job in jobs:
            if stop():
                return
            if started:
                started(job)
            t0 = self.busy.now()
            r = run_job(self.scorer, self.template, self.tasks, job)
            t1 = self.busy.now()
            self.busy.add(0, job.label, t0, t1)
            yield JobResult(job, r["scores"], plan_s=r["plan_s"], breed_s=r["breed_s"], scorer=0, start=t0, end=t1)

    def close(self) -> None:
        self.scorer.close()
