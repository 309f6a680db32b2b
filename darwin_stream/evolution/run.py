"""`evolve()`: genome -> plan -> child bred in the live engine -> fitness -> tell, resumable at any moment.

The order of one run:
1. plan the manifest once into a Template; claim the run directory for the search's fingerprint;
2. score the reference models (base, parents, a 50/50 linear merge) on both splits (refs.json);
3. replay history.jsonl into a fresh cma instance (no pickles), then ask/score/tell until a cap;
4. rescore the best candidates on the full set (subset mode) and pick the winner on it;
5. score the winner on the held-out split, export it with `darwin_stream.merge`, plot, write the card.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from darwin_stream.edge import at_edge
from darwin_stream.engine import PeakMemory
from darwin_stream.errors import DependencyError, EvolveError
from darwin_stream.evolution import fitness as fit
from darwin_stream.evolution import report as rep
from darwin_stream.evolution.history import Candidate, RunDir, digest
from darwin_stream.evolution.scorers import Job, LocalPool, ScorerPool
from darwin_stream.evolution.search import Search
from darwin_stream.manifest import Manifest, load_manifest
from darwin_stream.plan import Plan, build_plan
from darwin_stream.plan.template import Template
from darwin_stream.score.tasks import MAX_TASK_BYTES, Task
from darwin_stream.threads import torch_threads

Progress = Callable[[dict[str, Any]], None]
REFS_FILE = "refs.json"


def _check_extras() -> None:
    """Before any work: the plots need matplotlib, which only the evolve extra installs."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise DependencyError("evolve needs matplotlib for its plots: pip install -e '.[evolve]' (from a clone) "
                          "or pip install 'darwin-stream[evolve]'")


def default_run_dir(manifest: str | os.PathLike) -> Path:
    """`manifests/demo.yaml` -> `./demo.run`: derived from the manifest's name, in the working directory."""
    return Path(Path(manifest).stem + ".run")


def _file_digest(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise EvolveError(f"evolve.fitness: task file {path} does not exist")
    if p.stat().st_size > MAX_TASK_BYTES:
        raise EvolveError(f"evolve.fitness: task file {path} is larger than {MAX_TASK_BYTES >> 20} MiB")
    return hashlib.blake2b(p.read_bytes(), digest_size=12).hexdigest()


def fingerprint(m: Manifest, plan: Plan) -> dict[str, str]:
    """What alters the search, field by field, so a refused resume can name what changed.

    The template is its tensors and parents, not the manifest's text: a comment edit changes nothing.
    """
    sec = m.evolve
    assert sec is not None
    tensors = json.loads(plan.to_json())
    return {
        "template": digest({"parents": tensors["parents"], "tensors": tensors["tensors"],
                            "out_dtype": tensors["out_dtype"], "config_from": tensors["config_from"]}),
        "genes": digest([g.model_dump() for g in sec.genes]),
        "search": digest(sec.search.model_dump()),
        "fitness": digest({"tasks": [_file_digest(t) for t in sec.fitness.tasks],
                           "subset": sec.fitness.subset.model_dump() if sec.fitness.subset else None}),
        "heldout": digest([_file_digest(t) for t in sec.fitness.heldout]),
        # how many scorers run it changes nothing in the search (tests/evolution/test_parallel.py): a run
        # started on one can be resumed on four; the dump is the one from before the field existed
        "backend": digest(sec.backend.model_dump(exclude={"scorers"})),
    }


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[dict[str, bool]]:
    """Ctrl-C asks the loop to stop after the current candidate; a second one interrupts at once."""
    flag = {"stop": False}
    if threading_main():
        def handler(signum, frame):
            if flag["stop"]:
                raise KeyboardInterrupt
            flag["stop"] = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield flag
        finally:
            signal.signal(signal.SIGINT, old)
    else:
        yield flag


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def reference_models(m: Manifest, plan: Plan, tpl: Template) -> dict[str, Any]:
    """{label: checkpoint spec or Plan}: the base, each parent, and a fixed 50/50 linear merge."""
    refs: dict[str, Any] = {}
    if m.breed is not None:
        refs["parent " + m.breed.father] = m.breed.father
        refs["parent " + m.breed.mother] = m.breed.mother
        refs["linear_50_50"] = tpl.apply([0.5] * tpl.dim)
        return refs
    models = [im.model for im in (m.models or []) if im.model != m.base_model]
    if m.base_model:
        refs["base"] = m.base_model
    for spec in models:
        refs["parent " + spec] = spec
    if len(models) >= 2:
        import yaml

        from darwin_stream.manifest import parse_manifest

        lines = {"merge_method": "linear", "models": [{"model": s, "parameters": {"weight": 1 / len(models)}} for s in models]}
        if m.dtype:
            lines["dtype"] = m.dtype  # a safetensors code: the manifest reads codes and names alike
        text = yaml.safe_dump(lines, sort_keys=False)
        refs["linear_50_50"] = build_plan(parse_manifest(text), text)
    return refs


def _jobs(label: str, child: Any, splits: tuple[str, ...], pool: ScorerPool) -> list[Job]:
    """One job per child on one scorer (one load, as before pools); one per split on several, so
    that a reference's two splits are scored at once (breeding is 3% of a demo candidate)."""
    if pool.size == 1 or len(splits) == 1:
        return [Job(label, child, splits)]
    return [Job(f"{label}/{s}", child, (s,)) for s in splits]


def _score_refs(run: RunDir, pool: ScorerPool, refs: dict[str, Any], held: list[Task],
                progress: Progress | None) -> dict[str, dict[str, Any]]:
    """Each reference on both splits, all handed to the pool at once; kept in refs.json so a
    resumed run does not score them again."""
    path = run.path / REFS_FILE
    if path.is_file() and path.stat().st_size < 64 * 2**20:
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and set(data) == set(refs):
                return data
    splits = ("fitness", "heldout") if held else ("fitness",)
    jobs, owner = [], {}
    for name, child in refs.items():
        for job in _jobs(f"ref {name}", child, splits, pool):
            jobs.append(job)
            owner[job.label] = name
    announced: set[str] = set()

    def started(job: Job) -> None:
        if progress and owner[job.label] not in announced:
            announced.add(owner[job.label])
            progress({"event": "reference", "name": owner[job.label]})

    out: dict[str, dict[str, Any]] = {name: {"fitness": None, "heldout": None} for name in refs}
    for r in pool.run(jobs, started=started):
        out[owner[r.job.label]].update(r.scores)
    tmp = path.with_name(f".{REFS_FILE}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out


class _Loop:
    """The ask/score/tell loop over one run directory and a pool of scorers.

    A generation's candidates are handed to the pool together and scored as scorers come free; they
    are recorded in candidate order (history.jsonl, fsynced), so a candidate that finishes early
    waits in memory for the ones before it. cma's ask/tell needs a generation's every fitness
    before it asks again, so the pool runs dry at the end of each generation: that barrier is
    cma's, and the report's scorer utilisation counts it as idle time.
    """

    def __init__(self, tpl: Template, run: RunDir, pool: ScorerPool, history: list[Candidate],
                 progress: Progress | None):
        self.tpl, self.run, self.pool = tpl, run, pool
        self.history = history
        self.progress = progress
        self.search_cfg = tpl.section.search
        self.cache = {tuple(c.genome): c for c in history}
        self.scored = 0

    def run_search(self, search: Search, stop: dict[str, bool]) -> bool:
        """Returns True when a cap ended the search, False when it was interrupted."""
        cfg = self.search_cfg
        cap = cfg.max_evaluations or cfg.popsize * cfg.max_generations
        by_gen: dict[int, list[Candidate]] = {}
        for c in self.history:
            by_gen.setdefault(c.generation, []).append(c)
        full = [g for g in sorted(by_gen) if len(by_gen[g]) == cfg.popsize]
        search.replay([[(c.genome, c.fitness) for c in sorted(by_gen[g], key=lambda c: c.index)] for g in full])
        for gen in range(len(full), cfg.max_generations):
            if len(self.history) >= cap:
                return True
            xs = search.ask()
            done = {c.index: c for c in by_gen.get(gen, [])}
            for i in sorted(done):
                if i >= len(xs) or done[i].genome != xs[i]:
                    raise EvolveError(f"cannot resume: candidate {i} of generation {gen} differs from what the "
                                      "search asks; start a new --run-dir")
            ended = self.generation(gen, xs, done, cap, stop)
            if ended is not None:
                return ended
            results = {**done, **{c.index: c for c in self.history if c.generation == gen}}
            search.tell(xs, [results[i].fitness for i in range(len(xs))])
            if self.progress:
                stats = rep.generation_stats(self.history)[-1]
                self.progress({"event": "generation", "generation": gen, "generations": cfg.max_generations,
                               "best": stats[1], "mean": stats[2], "evaluations": len(self.history), "cap": cap})
            if stop["stop"]:
                return False
        return True

    def generation(self, gen: int, xs: list[list[float]], done: dict[int, Candidate], cap: int,
                   stop: dict[str, bool]) -> bool | None:
        """Score and record the candidates generation `gen` still lacks, in index order. None when
        the generation is complete; True when the evaluation cap cut it short; False when stopped."""
        left = [i for i in range(len(xs)) if i not in done]
        todo = left[: max(0, cap - len(self.history))]
        jobs: list[Job] = []
        index: dict[str, int] = {}
        repeat: dict[int, tuple[float, ...]] = {}
        seen: set[tuple[float, ...]] = set()
        for i in todo:
            key = tuple(xs[i])
            if key in self.cache or key in seen:
                repeat[i] = key  # served from the cache once its first occurrence is scored
            else:
                seen.add(key)
                jobs.append(Job(f"g{gen}c{i}", xs[i], ("search",)))
                index[jobs[-1].label] = i
        scored: dict[int, Candidate] = {}
        queue = deque(todo)

        def record() -> None:
            while queue:
                i = queue[0]
                if i in scored:
                    c = scored.pop(i)
                elif i in repeat and repeat[i] in self.cache and not stop["stop"]:
                    hit = self.cache[repeat[i]]
                    c = Candidate(gen, i, xs[i], hit.fitness, dict(hit.tasks), cached=True, full_fitness=hit.full_fitness)
                else:
                    return
                queue.popleft()
                self._record(c, cap)

        for r in self.pool.run(jobs, stop=lambda: stop["stop"]):
            i = index[r.job.label]
            s = r.scores["search"]
            c = Candidate(gen, i, xs[i], s["fitness"], s["tasks"], plan_s=r.plan_s, breed_s=r.breed_s,
                          score_s=s["seconds"])
            self.cache[tuple(xs[i])] = c
            self.scored += 1
            scored[i] = c
            record()
        record()
        if queue:
            return False
        if len(todo) < len(left):
            return not stop["stop"]
        return None

    def _record(self, c: Candidate, cap: int) -> None:
        self.run.append(c)
        self.history.append(c)
        if self.progress:
            self.progress({"event": "candidate", "generation": c.generation, "index": c.index, "fitness": c.fitness,
                           "evaluations": len(self.history), "cap": cap,
                           "seconds": c.plan_s + c.breed_s + c.score_s})


def _winner(loop: _Loop, subset: bool, top: int) -> Candidate:
    """The best candidate: on full-set fitness (rescored) in subset mode, never one lucky subset draw."""
    distinct: dict[tuple[float, ...], Candidate] = {}
    for c in loop.history:
        distinct.setdefault(tuple(c.genome), c)
    ranked = sorted(distinct.values(), key=lambda c: (-c.fitness, c.generation, c.index))
    if not subset:
        return ranked[0]
    todo = {f"rescore g{c.generation}c{c.index}": c for c in ranked[:top] if c.full_fitness is None}
    for r in loop.pool.run([Job(label, c.genome, ("fitness",)) for label, c in todo.items()]):
        todo[r.job.label].full_fitness = r.scores["fitness"]["fitness"]
    if todo:
        for c in loop.history:
            src = distinct[tuple(c.genome)]
            c.full_fitness = src.full_fitness
        loop.run.rewrite(loop.history)
    rescored = [c for c in ranked if c.full_fitness is not None]
    return max(rescored, key=lambda c: (c.full_fitness or 0.0, c.fitness, -c.generation, -c.index))


def _score_child(pool: ScorerPool, genome: list[float], held: bool) -> dict[str, dict[str, Any]]:
    """The winner on the fitness split and the held-out one (on two scorers at once, when there are)."""
    out: dict[str, dict[str, Any]] = {}
    for r in pool.run(_jobs("child", genome, ("fitness", "heldout") if held else ("fitness",), pool)):
        out.update(r.scores)
    return out


def _export(tpl: Template, x: list[float], text: str, run: RunDir, card_extra: dict[str, Any]) -> Path:
    """The winner through `darwin_stream.merge` (the CLI's code path), with its resolved manifest and card."""
    from darwin_stream import api

    resolved = tpl.resolved_manifest(x, text)
    (run.path / "child.yaml").write_text(resolved)
    staging = run.path / ".child.staging"
    final = run.path / "child"
    if staging.exists():
        shutil.rmtree(staging)
    api.merge(tpl.apply(x), staging)
    card = rep.model_card((staging / "README.md").read_text(), **card_extra)
    (staging / "README.md").write_text(card)
    (staging / "darwin-manifest.yaml").write_text(resolved)
    if (run.path / "fitness.png").exists():
        shutil.copyfile(run.path / "fitness.png", staging / "fitness.png")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


@at_edge("evolve")
def evolve(manifest: str | os.PathLike, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
           progress: Progress | None = None, backend: str | None = None, scorers: int | None = None,
           client: Any = None) -> rep.EvolveReport:
    """Run (or resume) the evolution a manifest's `evolve:` section describes; see docs/evolution.md.

    Args:
        manifest: a manifest path (or its YAML text, with `run_dir` given) with an `evolve:` section.
        run_dir: the run directory (journal, plots, child); default `<manifest stem>.run` beside it.
        resume: continue the run in `run_dir` (refused, naming the part, if the manifest changed).
        progress: called with one dict per event (a candidate scored, a generation done).
        backend: "vllm" or "hf", overriding the manifest's `evolve: backend: name`.
        scorers: how many live engines score candidates at once (default `evolve.backend.scorers`,
            else 1), each in a worker process of a dask LocalCluster started here (docs/cluster.md).
        client: a dask.distributed Client or a scheduler address: that cluster's workers score, one
            scorer per worker (all of them unless `scorers` says how many).

    Returns:
        An EvolveReport; `interrupted` is True when Ctrl-C stopped the search (resume continues it).

    Raises:
        ManifestError, SourceError, PlanError: the manifest and its parents.
        EvolveError: no evolve section, or a run directory that belongs to another search.
        ScoreError: a task file or the scoring backend. DependencyError: a missing extra (cma, vllm).
        StorageError: an I/O failure.
    """
    t_start = time.perf_counter()
    _check_extras()
    if scorers is not None and scorers < 1:
        raise EvolveError(f"scorers: expected at least 1, got {scorers}")
    m, text = load_manifest(manifest)
    if m.evolve is None:
        raise EvolveError("manifest: evolve: this manifest has no evolve section (see docs/evolution.md)")
    sec = m.evolve
    plan = build_plan(m, text)
    tpl = Template(plan, m)
    x0 = tpl.initial()
    if run_dir is None:
        if "\n" in os.fspath(manifest):
            raise EvolveError("evolve: give a run directory for a manifest passed as text")
        run_dir = default_run_dir(manifest)
    run = RunDir(run_dir)
    history = run.open(fingerprint(m, plan), resume=resume, manifest=os.fspath(manifest) if "\n" not in os.fspath(manifest) else "<text>")
    name = backend or sec.backend.name
    opts: dict[str, Any] = {"dtype": sec.backend.dtype}
    if sec.backend.max_model_len and name == "vllm":
        opts["max_model_len"] = sec.backend.max_model_len
    n = scorers if scorers is not None else sec.backend.scorers

    def open_pool() -> ScorerPool:
        return _open_pool(name, opts, sec.backend.threads, tpl, x0, n, client)

    with torch_threads(sec.backend.threads), PeakMemory() as mem:
        report = _run(m, text, tpl, x0, run, history, sec, open_pool, progress, t_start)
    report.wall_s = round(time.perf_counter() - t_start, 3)
    report.peak_anon_bytes, report.baseline_anon_bytes = mem.peak, mem.baseline
    return report


def _open_pool(backend: str, opts: dict[str, Any], threads: int | None, tpl: Template, x0: list[float],
               n: int | None, client: Any) -> ScorerPool:
    """One scorer in this process (the default), or N on dask.distributed."""
    if client is None and (n or 1) == 1:
        from darwin_stream.score.backend import open_backend

        return LocalPool(fit.Scorer(open_backend(backend, tpl.apply(x0), **opts)), tpl)
    # dask.distributed is heavy and only needed here: imported only for a run with several scorers
    from darwin_stream.evolution.dask_scorers import open_pool

    return open_pool(n, client, backend=backend, options=opts, threads=threads, template=tpl, x0=x0)


def _run(m: Manifest, text: str, tpl: Template, x0: list[float], run: RunDir, history: list[Candidate],
         sec: Any, open_pool: Callable[[], ScorerPool], progress: Progress | None,
         t_start: float) -> rep.EvolveReport:
    fit_tasks = fit.copy_tasks(sec.fitness.tasks, run.path / "tasks" / "fitness")
    held = fit.copy_tasks(sec.fitness.heldout, run.path / "tasks" / "heldout")
    n_overlap = fit.overlap(fit_tasks, held)
    if n_overlap:
        print(f"darwin-stream: warning: {n_overlap} held-out items also appear in the fitness split", file=sys.stderr)
    plan = tpl.plan
    t_engine = time.perf_counter()
    pool = open_pool()
    seconds = {"engine_start": time.perf_counter() - t_engine}
    try:
        pool.set_tasks({"fitness": fit_tasks, "heldout": held})
        t0 = time.perf_counter()
        refs = _score_refs(run, pool, reference_models(m, plan, tpl), held, progress)
        seconds["references"] = time.perf_counter() - t0
        search_tasks, subset_info = fit_tasks, None
        if sec.fitness.subset is not None:
            per_item = [r["fitness"]["correct"] for r in refs.values()]
            search_tasks = fit.pick_subset(fit_tasks, per_item, sec.fitness.subset.items)
            subset_info = {"items": sum(len(t.items) for t in search_tasks),
                           "full_items": sum(len(t.items) for t in fit_tasks)}
        pool.set_tasks({"search": search_tasks})
        loop = _Loop(tpl, run, pool, history, progress)
        search = Search(x0, sec.search.sigma0, lower=tpl.lower, upper=tpl.upper,
                        popsize=sec.search.popsize, seed=sec.search.seed)
        t0 = time.perf_counter()
        with _stop_on_sigint() as stop:
            finished = loop.run_search(search, stop)
        seconds["search"] = time.perf_counter() - t0
        if not finished:
            return _interrupted(loop, run, t_start)
        t0 = time.perf_counter()
        top = sec.fitness.subset.rescore_top if sec.fitness.subset else 0
        best = _winner(loop, sec.fitness.subset is not None, top)
        seconds["rescore"] = time.perf_counter() - t0
        child = _score_child(pool, best.genome, bool(held))
        child_fit, child_held = child["fitness"], child.get("heldout")
    finally:
        pool.close()
    if subset_info is not None:
        pairs = [(c.fitness, c.full_fitness) for c in {tuple(c.genome): c for c in loop.history}.values()
                 if c.full_fitness is not None]
        subset_info["spearman"] = fit.spearman([a for a, _ in pairs], [b for _, b in pairs])
        subset_info["rescored"] = len(pairs)
    return _finish(tpl, text, run, refs, best, child_fit, child_held, loop, search, seconds, subset_info, t_start)


def _interrupted(loop: _Loop, run: RunDir, t_start: float) -> rep.EvolveReport:
    best = max(loop.history, key=lambda c: c.fitness) if loop.history else None
    return rep.EvolveReport(
        best_fitness=best.fitness if best else float("nan"), heldout={}, generations=len({c.generation for c in loop.history}),
        evaluations=len(loop.history), run_dir=str(run.path), child_dir="", genome=best.genome if best else [],
        scored_evaluations=loop.scored, seconds={"total": time.perf_counter() - t_start}, interrupted=True,
        scorers=loop.pool.busy.summary())


def _rows(refs: dict[str, dict[str, Any]], child: dict[str, Any] | None, split: str) -> dict[str, dict[str, Any]]:
    rows = {name: r[split] for name, r in refs.items() if r.get(split)}
    if child is not None:
        rows["evolved child"] = child
    return rows


def _finish(tpl: Template, text: str, run: RunDir, refs: dict[str, Any], best: Candidate, child_fit: dict[str, Any],
            child_held: dict[str, Any] | None, loop: _Loop, search: Search, seconds: dict[str, float],
            subset_info: dict[str, Any] | None, t_start: float) -> rep.EvolveReport:
    parents_fit = {name: r["fitness"]["fitness"] for name, r in refs.items()}
    rep.plot_fitness(loop.history, parents_fit, run.path / "fitness.png")
    cols, rows = tpl.table(best.genome)
    rep.plot_genome(cols, rows, run.path / "genome.png")
    fit_rows, held_rows = _rows(refs, child_fit, "fitness"), _rows(refs, child_held, "heldout")
    gens = len({c.generation for c in loop.history})
    t0 = time.perf_counter()
    child_dir = _export(tpl, best.genome, text, run, {
        "genome_text": _genome_text(cols, rows), "fitness_rows": fit_rows, "heldout_rows": held_rows,
        "generations": gens, "evaluations": len(loop.history)})
    seconds["export"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    def held_of(name: str) -> float | None:
        r = refs.get(name, {}).get("heldout")
        return r["fitness"] if r else None

    heldout = {
        "child": child_held["fitness"] if child_held else None,
        "base": held_of("base"),
        "parents": {n.removeprefix("parent "): held_of(n) for n in refs if n.startswith("parent ")},
        "linear_50_50": held_of("linear_50_50"),
    }
    report = rep.EvolveReport(
        best_fitness=best.full_fitness if best.full_fitness is not None else best.fitness,
        heldout=heldout, generations=gens, evaluations=len(loop.history), run_dir=str(run.path),
        child_dir=str(child_dir), genome=best.genome,
        fitness={"child": child_fit["fitness"], **{n: r["fitness"]["fitness"] for n, r in refs.items()}},
        scored_evaluations=loop.scored, seconds={k: round(v, 3) for k, v in seconds.items()}, subset=subset_info,
        tables={"fitness": _plain(fit_rows), "heldout": _plain(held_rows)}, scorers=loop.pool.busy.summary())
    (run.path / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (run.path / "scores.md").write_text("## Fitness split\n\n" + rep.score_table(fit_rows) + "\n\n## Held-out split\n\n"
                                        + (rep.score_table(held_rows) if held_rows else "(none)") + "\n")
    return report


def _plain(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: {"tasks": r["tasks"], "fitness": r["fitness"]} for name, r in rows.items()}


def _genome_text(cols: list[str], rows: list[list[float]]) -> str:
    head = "layer  " + "  ".join(f"{c:>12}" for c in cols)
    return "\n".join([head] + [f"{i:>5}  " + "  ".join(f"{v:>12.4f}" for v in r) for i, r in enumerate(rows)])
