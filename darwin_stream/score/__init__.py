"""Scoring children on tasks, with one live inference engine per run (vLLM or transformers).

    from darwin_stream.score import open_backend, load_task, score_child, resolve_model
    tasks = [load_task("arc.jsonl")]
    backend = open_backend("vllm", resolve_model("child.yaml"))   # plan: bred in place
    result = score_child(backend, tasks)                           # {"tasks": ..., "fitness": ...}
    backend.load(resolve_model("other/dir")); score_child(backend, tasks)
    backend.close()

Nothing here imports vLLM at import time; only `open_backend("vllm", ...)` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from darwin_stream.score.backend import BACKENDS, install_hint, open_backend, resolve_model
    from darwin_stream.score.child import Child
    from darwin_stream.score.run import score_child
    from darwin_stream.score.tasks import Task, fitness, load_task, run_task

_HOMES = {
    "BACKENDS": "backend", "Child": "child", "install_hint": "backend", "open_backend": "backend",
    "resolve_model": "backend", "score_child": "run", "Task": "tasks", "fitness": "tasks",
    "load_task": "tasks", "run_task": "tasks",
}


def __getattr__(name: str):
    # Lazy, so that `darwin-stream merge` (whose parser lists `score`) does not import the backends.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"darwin_stream.score.{_HOMES[name]}"), name)
    raise AttributeError(name)


__all__ = [
    "BACKENDS",
    "Child",
    "Task",
    "fitness",
    "install_hint",
    "load_task",
    "open_backend",
    "resolve_model",
    "run_task",
    "score_child",
]
