"""Fitness for the search: the scorer's tasks on a live backend, and the cheap subset mode.

Subset rule (docs/evolution.md): after the parents are scored on the full fitness set, each task
keeps the items on which the parents (the base included) do not all agree, in file order, up to
`subset.items`; when fewer separate them, the rest is filled with the first agreeing items, so a
subset never shrinks below what was asked. Items every parent gets right (or wrong) cannot rank
blends of those parents, which is the anchor-point idea of tinyBenchmarks and MERGE3 made as simple
as the per-item records allow.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from darwin_stream.errors import EvolveError
from darwin_stream.score.run import score_child
from darwin_stream.score.tasks import Task, load_task


def copy_tasks(paths: list[str], dest: Path) -> list[Task]:
    """Copy task files into the run (tasks/fitness, tasks/heldout) and load the copies."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        src = Path(p)
        if not src.is_file():
            raise EvolveError(f"evolve.fitness: task file {p} does not exist")
        target = dest / src.name
        if target.exists() and target.read_bytes() != src.read_bytes():
            raise EvolveError(f"evolve.fitness: two task files are named {src.name}; rename one")
        shutil.copyfile(src, target)
        out.append(load_task(target))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise EvolveError(f"evolve.fitness: two tasks share the name {next(n for n in names if names.count(n) > 1)!r}")
    return out


def overlap(fitness: list[Task], heldout: list[Task]) -> int:
    """Items (by prompt, choices and answer) that appear in both splits."""
    def key(item: dict[str, Any]) -> str:
        return repr(sorted((k, repr(v)) for k, v in item.items()))

    seen = {key(i) for t in fitness for i in t.items}
    return sum(key(i) in seen for t in heldout for i in t.items)


def pick_subset(tasks: list[Task], per_item: list[dict[str, list[bool]]], n: int) -> list[Task]:
    """`per_item[p][task] = [correct?]` for each parent p: keep the items that separate them."""
    out = []
    for t in tasks:
        rows = [p[t.name] for p in per_item]
        split = [i for i in range(len(t.items)) if len({r[i] for r in rows}) > 1]
        same = [i for i in range(len(t.items)) if i not in set(split)]
        keep = sorted((split + same)[: min(n, len(t.items))])
        out.append(dataclasses.replace(t, items=[t.items[i] for i in keep]))
    return out


def correctness(result: dict[str, Any]) -> dict[str, list[bool]]:
    """Per task, per item: was it right? (choice and generate; perplexity has no right answer)."""
    out: dict[str, list[bool]] = {}
    for d in result["details"]:
        if "correct" in d:
            out.setdefault(d["task"], []).append(bool(d["correct"]))
        else:
            out.setdefault(d["task"], []).append(False)
    return out


class Scorer:
    """One live backend; `load` a child (plan or checkpoint), `score` it on a task list."""

    def __init__(self, backend: Any):
        self.backend = backend

    def load(self, child: Any) -> float:
        t0 = time.perf_counter()
        self.backend.load(child)
        return time.perf_counter() - t0

    def score(self, tasks: list[Task]) -> dict[str, Any]:
        return score_child(self.backend, tasks)

    def close(self) -> None:
        self.backend.close()


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation with average ranks for ties; None when either side is constant."""
    if len(a) != len(b) or len(a) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / (va * vb) ** 0.5
