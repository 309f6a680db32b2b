"""Score one loaded child on a list of tasks."""

from __future__ import annotations

import time
from typing import Any

from darwin_stream.score.tasks import Task, fitness, run_task


def score_child(backend: Any, tasks: list[Task]) -> dict[str, Any]:
    """{"tasks": {name: {"kind", "metric", "score", "n"}}, "fitness", "seconds", "details": [...]}.

    Scores whatever child the backend holds now; details are one record per item (for --details).
    """
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    details: list[dict[str, Any]] = []
    for task in tasks:
        score, recs = run_task(backend, backend.tokenizer, task)
        results[task.name] = {"kind": task.kind, "metric": task.metric, "score": score, "n": len(task.items)}
        details.extend(recs)
    return {
        "tasks": results,
        "fitness": fitness(results, tasks),
        "seconds": time.perf_counter() - t0,
        "details": details,
    }
