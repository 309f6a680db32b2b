"""Several scorers on dask.distributed: the one-scorer run's history and winner, and no scorer idle
while another is held up by a slow candidate.

The models are the demo's (demo_models.build_demo), made small enough to build in seconds (a
64-wide, 2-layer Qwen3 trained for 300 + 100 steps: it learns a little of each skill, so candidates
score differently), and the search is cut to 3 generations of 6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from darwin_stream import demo_models as dm
from darwin_stream.errors import EvolveError
from darwin_stream.evolution import demo
from darwin_stream.evolution.history import RunDir
from darwin_stream.evolution.run import evolve
from darwin_stream.evolution.scorers import SLOW_JOB_ENV
from tests.helpers import wait_for_history

POPSIZE, GENERATIONS = 6, 3
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=64, tie_word_embeddings=True)


def _settings() -> dm.DemoSettings:
    s = dm.with_steps(dm.DemoSettings(n_fitness=24, n_heldout=16, batch=32, model=MODEL), base=300, parents=100)
    return replace(s, base=replace(s.base, lr=3e-3), parent_a=replace(s.parent_a, lr=1e-3),
                   parent_b=replace(s.parent_b, lr=1e-3))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pardemo")
    dm.build_demo(root, seed=0, settings=_settings())
    return demo.demo_manifest(root, 0, lambda t: t.replace(
        "popsize: 8, sigma0: 0.3, max_generations: 12", f"popsize: {POPSIZE}, sigma0: 0.3, max_generations: {GENERATIONS}"))


def _history(run_dir: Path) -> list[tuple]:
    """Every field of every line but the timings (plan_s, breed_s, score_s)."""
    return [(c.generation, c.index, c.genome, c.fitness, c.tasks, c.cached, c.full_fitness)
            for c in RunDir(run_dir).read_history()]


def _untimed(refs_file: Path) -> dict:
    refs = json.loads(refs_file.read_text())
    return {name: {split: {k: v for k, v in r.items() if k != "seconds"} for split, r in splits.items() if r}
            for name, splits in refs.items()}


@pytest.fixture(scope="module")
def one(manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return run_dir, evolve(manifest, run_dir)


@pytest.mark.slow
def test_two_scorers_give_the_one_scorer_history_and_winner(one, manifest, tmp_path):
    run1, r1 = one
    r2 = evolve(manifest, tmp_path / "run", scorers=2)
    h1, h2 = _history(run1), _history(tmp_path / "run")
    assert len(h1) == POPSIZE * GENERATIONS and h2 == h1
    assert len({h[3] for h in h1}) > 1  # the candidates' fitness differs: the comparison can fail
    assert r2.genome == r1.genome and r2.best_fitness == r1.best_fitness and r2.heldout == r1.heldout
    assert _untimed(tmp_path / "run" / "refs.json") == _untimed(run1 / "refs.json")
    assert r1.scorers["scorers"] == 1 and r2.scorers["scorers"] == 2
    assert all(n > 0 for n in r2.scorers["jobs"])  # both engines scored
    assert json.loads((tmp_path / "run" / "report.json").read_text())["scorers"]["scorers"] == 2


@pytest.mark.slow
def test_a_slow_candidate_does_not_idle_the_other_scorer(one, manifest, tmp_path, monkeypatch):
    slow = "g1c0"  # generation 1: both engines are warm by then
    monkeypatch.setenv(SLOW_JOB_ENV, f"{slow}=4")  # read by the scorers' own processes
    report = evolve(manifest, tmp_path / "run", scorers=2)
    assert _history(tmp_path / "run") == _history(one[0])  # recorded in candidate order all the same
    spans = report.scorers["intervals"]
    (k, _, start, end), = [s for s in spans if s[1] == slow]
    assert end - start >= 4
    others = [s for s in spans if s[1].startswith("g1c") and s[1] != slow]
    assert len(others) == POPSIZE - 1
    # the other scorer took every other candidate of the generation, and finished them while the
    # slow one was still being scored: no barrier held it back
    assert all(s[0] != k and start <= s[2] and s[3] < end for s in others)


def _start(manifest: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "darwin_stream.cli", "evolve", str(manifest), "--run-dir",
                             str(run_dir), "--quiet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            start_new_session=True)


@pytest.mark.slow
def test_sigkill_of_a_two_scorer_run_resumes_on_one_scorer_to_the_same_history(one, manifest, tmp_path):
    run_dir = tmp_path / "killed"
    # g1c3 holds its scorer; c4 and c5 finish on the other and wait in memory behind it
    proc = _start(manifest, run_dir, "--scorers", "2", env={SLOW_JOB_ENV: "g1c3=30"})
    wait_for_history(run_dir, POPSIZE + 3, proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _history(run_dir)
    assert len(before) == POPSIZE + 3  # a prefix in candidate order: nothing recorded past the gap
    report = evolve(manifest, run_dir, resume=True)  # the scorer count is not part of the fingerprint
    assert _history(run_dir) == _history(one[0])
    assert report.scored_evaluations <= POPSIZE * GENERATIONS - len(before)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_a_two_scorer_run_resumably(one, manifest, tmp_path):
    """Ctrl-C in a terminal reaches the workers too: they ignore it, and the in-flight candidates finish."""
    run_dir = tmp_path / "stopped"
    proc = _start(manifest, run_dir, "--scorers", "2", env={SLOW_JOB_ENV: "g1c1=3"})
    wait_for_history(run_dir, POPSIZE + 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert len(_history(run_dir)) >= POPSIZE + 2  # the slow candidate, in flight at Ctrl-C, was recorded
    evolve(manifest, run_dir, resume=True, scorers=2)
    assert _history(run_dir) == _history(one[0])


def test_a_scorer_count_below_one_is_one_line(tmp_path):
    with pytest.raises(EvolveError, match="scorers: expected at least 1, got 0"):
        evolve(tmp_path / "whatever.yaml", tmp_path / "r", scorers=0)
    from darwin_stream.errors import DarwinError
    from darwin_stream.manifest import parse_manifest

    with pytest.raises(DarwinError, match="scorers must be at least 1"):
        parse_manifest("merge_method: linear\nmodels: [{model: a}, {model: b}]\nevolve:\n  genes: [{param: weight}]\n"
                       "  fitness: {tasks: [t.jsonl]}\n  backend: {scorers: 0}\n")


@pytest.mark.slow
def test_more_scorers_than_the_cluster_has_workers_is_one_line(manifest, tmp_path, monkeypatch):
    from dask.distributed import Client, LocalCluster

    from darwin_stream.evolution import dask_scorers

    monkeypatch.setattr(dask_scorers, "WORKER_WAIT_S", 1.0)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, pytest.raises(EvolveError, match="2 asked for, but the dask cluster has 1 workers"):
        evolve(manifest, tmp_path / "r", scorers=2, client=client)


def test_a_bad_scheduler_address_is_one_line(trio, tmp_path, capsys):
    from darwin_stream.cli import main
    from tests.helpers import evolve_yaml

    p = tmp_path / "evo.yaml"
    p.write_text(evolve_yaml(trio))
    assert main(["evolve", str(p), "--run-dir", str(tmp_path / "r"), "--scheduler", "nonsense://nowhere:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheduler nonsense://nowhere:1: cannot connect to a dask scheduler" in err[0]
    assert not (tmp_path / "r" / "history.jsonl").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_two_vllm_scorers_give_the_one_scorer_history(trio, tmp_path):
    """vLLM engines inside dask workers (non-daemon, so that vLLM can start its engine processes)."""
    pytest.importorskip("vllm")
    from tests.helpers import evolve_yaml

    p = tmp_path / "v.yaml"
    p.write_text(evolve_yaml(trio, search="{popsize: 2, max_generations: 2, sigma0: 0.3}")
                 .replace("{name: hf, dtype: float32}", "{name: vllm, dtype: float32}"))
    r1 = evolve(p, tmp_path / "one")
    r2 = evolve(p, tmp_path / "two", scorers=2)
    assert _history(tmp_path / "two") == _history(tmp_path / "one") and len(_history(tmp_path / "one")) == 4
    assert r2.genome == r1.genome and r2.scorers["scorers"] == 2 and all(n > 0 for n in r2.scorers["jobs"])
