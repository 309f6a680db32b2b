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

from darwin_stream.score.backend import BACKENDS, Child, install_hint, open_backend, resolve_model
from darwin_stream.score.run import score_child
from darwin_stream.score.tasks import Task, fitness, load_task, run_task

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
