"""N scorers on dask.distributed: one actor per worker process, each holding one live engine.

Why a dask actor per scorer, and not a task per candidate or one long-lived task per worker:
- A scorer is state: a live engine (a vLLM start is about 30 s; a transformers model is built once
  and bred into), its tokenizer, and the child it holds, whose unchanged tensors the next breed
  skips. An actor is an object that stays on one worker between calls, which is exactly that. A task
  per candidate would hide the engine in a worker global, and the scheduler would be free to run
  two candidates on one worker's threads at once: two children bred into one model.
- dask runs an actor's calls one at a time, on the worker's single actor thread, so one engine never
  holds two children at once, whatever the worker's thread count.
- One long-lived task per worker would need a queue of its own (a dask Queue, pub/sub) and its own
  error reporting. With actors the queue lives in the loop's process (`DaskPool.run`): a scorer is
  handed its next job the moment its result is back, so no scorer waits for a generation's slowest
  child, and an error the scorer raises (a DarwinError naming the problem) comes back as itself.
Their cost: dask does not restart an actor whose worker died. The run then stops with a one-line
error, and `--resume` continues it (history.jsonl is fsynced per candidate).

Messages are small: each scorer gets the template and the task lists once; a candidate's job is
its genome (the scorer applies it to the template itself: 0.4 ms), and its result is the scores.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from darwin_stream.errors import EvolveError
from darwin_stream.evolution.scorers import BusyLog, Job, JobResult, Started, run_job
from darwin_stream.score.tasks import Task

# How long a given cluster may take to offer the workers asked for (an adaptive cloud cluster
# starts machines on demand: minutes), before the run stops with a one-line error.
WORKER_WAIT_S = 600.0


class ScorerActor:
    """One live engine on one dask worker (created with `client.submit(ScorerActor, actor=True)`)."""

    def __init__(self) -> None:
        self.scorer: Any = None
        self.template: Any = None
        self.tasks: dict[str, list[Task]] = {}
        self.threads: int | None = None

    def start(self, backend: str, options: dict[str, Any], threads: int | None, template: Any,
              x0: list[float], gpu: int | None = None) -> dict[str, Any]:
        """Open the engine on the template's starting child, as the one-scorer path does."""
        import time

        from darwin_stream.evolution.fitness import Scorer
        from darwin_stream.score.backend import open_backend
        from darwin_stream.threads import torch_threads

        if gpu is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before the engine touches CUDA
        t0 = time.perf_counter()
        self.template, self.threads = template, threads
        with torch_threads(threads):
            self.scorer = Scorer(open_backend(backend, template.apply(x0), **options))
        return {"pid": os.getpid(), "seconds": time.perf_counter() - t0}

    def set_tasks(self, tasks: dict[str, list[Task]]) -> None:
        self.tasks.update(tasks)

    def run(self, job: Job) -> dict[str, Any]:
        from darwin_stream.threads import torch_threads

        with torch_threads(self.threads):
            return run_job(self.scorer, self.template, self.tasks, job)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None


class DaskPool:
    """N `ScorerActor`s, one per worker of `client`'s cluster; jobs go to whichever is free next."""

    def __init__(self, client: Any, n: int, *, backend: str, options: dict[str, Any], threads: int | None,
                 template: Any, x0: list[float], gpus: Sequence[int | None] | None = None,
                 owned: Sequence[Any] = ()):
        self.client, self.size, self._owned = client, n, list(owned)
        self.busy = BusyLog(n)
        self._waiters = cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="darwin-scorer-wait")
        try:
            workers = self.workers = _workers(client, n)
            tag = uuid.uuid4().hex[:8]
            self._futures = [client.submit(ScorerActor, actor=True, workers=[w], allow_other_workers=False,
                                           pure=False, key=f"darwin-scorer-{k}-{tag}") for k, w in enumerate(workers)]
            self.actors = [f.result() for f in self._futures]
            gpus = list(gpus or [None] * n)
            starts = [a.start(backend, options, threads, template, x0, gpus[k]) for k, a in enumerate(self.actors)]
            self.info = [dict(s.result(), worker=w) for s, w in zip(starts, workers, strict=True)]
        except BaseException:
            self.close()
            raise

    def set_tasks(self, tasks: dict[str, list[Task]]) -> None:
        for f in [a.set_tasks(tasks) for a in self.actors]:
            f.result()

    def run(self, jobs: Sequence[Job], *, stop: Callable[[], bool] = lambda: False,
            started: Started | None = None) -> Iterator[JobResult]:
        """Keep every scorer busy: hand a job to each free scorer, and the next one to whichever
        scorer returns first. In-flight jobs finish after `stop()`; none starts after it."""
        pending = deque(jobs)
        free = deque(range(self.size))
        inflight: dict[cf.Future, tuple[int, Job, float]] = {}
        while True:
            while free and pending and not stop():
                k, job = free.popleft(), pending.popleft()
                if started:
                    started(job)
                t0 = self.busy.now()
                call = self.actors[k].run(job)
                inflight[self._waiters.submit(self._wait, call)] = (k, job, t0)
            if not inflight:
                return
            done, _ = cf.wait(list(inflight), timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: inflight[f][0]):
                k, job, t0 = inflight.pop(fut)
                r, t1 = fut.result()
                if isinstance(r, BaseException):
                    raise _lost(k, self.workers[k], r)
                self.busy.add(k, job.label, t0, t1)
                free.append(k)
                yield JobResult(job, r["scores"], plan_s=r["plan_s"], breed_s=r["breed_s"], scorer=k, start=t0, end=t1)

    def _wait(self, call: Any) -> tuple[Any, float]:
        """Block on one actor call in a waiter thread; the end time is when the scorer finished,
        not when the loop got round to it."""
        try:
            r = call.result()
        except Exception as e:  # re-raised in the loop's thread, where the run can report it
            r = e
        return r, self.busy.now()

    def close(self) -> None:
        calls = []
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):  # best effort: a lost worker's actor cannot be called
                calls.append(a.close())
        for call in calls:
            with contextlib.suppress(Exception):  # the results are already recorded
                call.result(timeout=60)
        self._waiters.shutdown(wait=False, cancel_futures=True)
        for f in getattr(self, "_futures", []):
            with contextlib.suppress(Exception):
                f.release()
        for thing in self._owned:
            with contextlib.suppress(Exception):
                thing.close()
        self._owned = []


def _lost(k: int, worker: str, e: BaseException) -> BaseException:
    from darwin_stream.errors import DarwinError

    if isinstance(e, DarwinError):
        return e  # the scorer's own one-line error (a bad task item, a child that does not fit)
    if isinstance(e, (OSError, RuntimeError)) and ("worker" in str(e).lower() or "actor" in str(e).lower()):
        return EvolveError(f"scorer {k} (dask worker {worker}) was lost ({str(e).splitlines()[0][:200]}); "
                           "continue the run with --resume")
    return e


def _workers(client: Any, n: int) -> list[str]:
    """The first `n` workers' addresses (sorted: the same placement for the same cluster)."""
    try:
        client.wait_for_workers(n, timeout=WORKER_WAIT_S)
    except TimeoutError:
        have = len(client.scheduler_info()["workers"])
        raise EvolveError(f"scorers: {n} asked for, but the dask cluster has {have} workers after "
                          f"{WORKER_WAIT_S:.0f} s; each scorer needs a worker of its own") from None
    return sorted(client.scheduler_info()["workers"])[:n]


def connect(client: Any) -> tuple[Any, list[Any]]:
    """A Client, or a scheduler address (`--scheduler`) opened as one (then closed with the pool)."""
    if not isinstance(client, str):
        return client, []
    from dask.distributed import Client  # optional and heavy: only for a cluster run

    try:
        c = Client(client, timeout="30s")
    except (ValueError, TypeError, OSError) as e:  # a malformed address, an unknown scheme, no answer
        raise EvolveError(f"--scheduler {client}: cannot connect to a dask scheduler ({e})") from None
    return c, [c]


def local_cluster(n: int, *, vllm: bool) -> tuple[Any, list[Any]]:
    """A LocalCluster of `n` single-thread worker processes, and a Client on it.

    - No memory limit: dask's limit is for task data, which a scorer holds none of; an engine is
      sized by its own settings, and the nanny would otherwise restart a worker whose model is
      larger than its share of RAM (an actor is never restarted).
    - vLLM starts processes of its own, which a daemonic process may not: its workers are not daemons.
    - The workers start with SIGINT ignored (a disposition they inherit): Ctrl-C in a terminal goes to
      the whole process group, and the loop's own handler stops the run after the candidates being
      scored, which a worker killed by the same Ctrl-C could not finish.
    """
    import dask
    from dask.distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": not vllm}), _sigint_ignored():
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=0,
                               dashboard_address=None, silence_logs=logging.ERROR)
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return client, [client, cluster]


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def local_gpus(n: int) -> list[int | None]:
    """One GPU per scorer when this machine has at least `n` (a LocalCluster does not pin them)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch CUDA build, no driver
        count = 0
    return list(range(n)) if count >= n else [None] * n


def open_pool(n: int | None, client: Any, *, backend: str, options: dict[str, Any], threads: int | None,
              template: Any, x0: list[float]) -> DaskPool:
    """`n` scorers on `client` (a Client or an address; each scorer needs a worker of its own), or
    on a LocalCluster of `n` processes started here when no client is given."""
    if client is None:
        assert n is not None and n > 1
        client, owned = local_cluster(n, vllm=backend == "vllm")
        gpus = local_gpus(n)
    else:
        client, owned = connect(client)
        gpus = None
        if n is None:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                for thing in owned:
                    thing.close()
                raise EvolveError("the dask cluster has no workers to hold a scorer") from None
            n = len(client.scheduler_info()["workers"])
    # DaskPool closes what was opened here if it cannot start
    return DaskPool(client, n, backend=backend, options=options, threads=threads, template=template, x0=x0,
                    gpus=gpus, owned=owned)
