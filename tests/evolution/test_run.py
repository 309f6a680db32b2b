"""The loop end to end on tiny parents with the transformers backend: outputs, resume, stop, subset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from darwin_stream.evolution import evolve
from darwin_stream.evolution.history import RunDir
from tests.helpers import DATA, evolve_yaml, wait_for_history

pytestmark = pytest.mark.slow

SEARCH = "{popsize: 4, max_generations: 3, sigma0: 0.4, seed: 3}"


def _history(run_dir: Path) -> list[tuple]:
    return [(c.generation, c.index, c.genome, c.fitness) for c in RunDir(run_dir).read_history()]


@pytest.fixture(scope="module")
def manifest(trio, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("m") / "evo.yaml"
    p.write_text(evolve_yaml(trio, search=SEARCH))
    return p


@pytest.fixture(scope="module")
def finished(manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "whole"
    return run_dir, evolve(manifest, run_dir)


def test_a_run_leaves_its_outputs(finished, manifest):
    run_dir, report = finished
    assert report.evaluations == 12 and report.generations == 3
    for name in ("history.jsonl", "fitness.png", "genome.png", "child.yaml", "report.json",
                 "tasks/fitness/capitals_choice.jsonl", "tasks/heldout/corpus_perplexity.jsonl"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    h = RunDir(run_dir).read_history()
    assert len({(c.generation, c.index) for c in h}) == 12
    assert all(c.breed_s >= 0 and c.score_s > 0 for c in h if not c.cached)
    assert report.best_fitness == max(c.fitness for c in h)
    assert set(report.heldout) == {"child", "base", "parents", "linear_50_50"}
    assert len(report.heldout["parents"]) == 2
    card = (Path(report.child_dir) / "README.md").read_text()
    assert "## Evolution" in card and "Held-out split" in card


def test_the_resolved_manifest_rebuilds_the_child(finished, tmp_path):
    from darwin_stream import merge
    from tests.helpers import read_all

    run_dir, report = finished
    out = tmp_path / "again"
    merge(run_dir / "child.yaml", out)
    a, b = read_all(report.child_dir), read_all(out)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_scoring_the_child_reproduces_the_heldout_figure(finished):
    from darwin_stream.cli import main

    run_dir, report = finished
    proc = subprocess.run([sys.executable, "-m", "darwin_stream.cli", "score", report.child_dir, "--backend", "hf",
                           "--dtype", "float32", "--json", "--tasks", *map(str, (run_dir / "tasks/heldout").glob("*.jsonl"))],
                          capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fitness"] == pytest.approx(report.heldout["child"], rel=1e-6)
    assert main  # imported for the CLI's code path


def _start(manifest: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "darwin_stream.cli", "evolve", str(manifest), "--run-dir",
                             str(run_dir), "--quiet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_sigkill_then_resume_gives_the_uninterrupted_history(finished, manifest, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _start(manifest, run_dir)
    wait_for_history(run_dir, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _history(run_dir)
    assert 6 <= len(before) < 12
    report = evolve(manifest, run_dir, resume=True)
    after = _history(run_dir)
    assert after == _history(finished[0])  # no duplicate, no missing candidate, same genomes and fitness
    assert report.best_fitness == finished[1].best_fitness
    assert report.scored_evaluations <= 12 - len(before)


def test_ctrl_c_stops_after_the_candidate_and_leaves_a_resumable_run(finished, manifest, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = _start(manifest, run_dir)
    wait_for_history(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    n = len(_history(run_dir))
    assert 3 <= n < 12
    assert (run_dir / "history.jsonl").read_text().endswith("\n")
    evolve(manifest, run_dir, resume=True)
    assert _history(run_dir) == _history(finished[0])


def test_subset_mode_scores_fewer_items_and_picks_the_winner_on_the_full_set(trio, tmp_path):
    fitness = (f"    tasks: [{DATA / 'capitals_choice.jsonl'}]\n"
               "    subset: {items: 3, rescore_top: 3}\n")
    p = tmp_path / "sub.yaml"
    p.write_text(evolve_yaml(trio, search="{popsize: 4, max_generations: 2, sigma0: 0.4}", fitness=fitness))
    report = evolve(p, tmp_path / "run")
    assert report.subset["items"] == 3 and report.subset["full_items"] == 6
    h = RunDir(tmp_path / "run").read_history()
    rescored = [c for c in h if c.full_fitness is not None]
    assert rescored and report.best_fitness == max(c.full_fitness for c in rescored)
    assert report.heldout["child"] is None  # no held-out split given


def test_bad_input_is_one_line(trio, tmp_path, capsys):
    from darwin_stream.cli import main

    fitness = "    tasks: [/nonexistent/tasks.jsonl]\n"
    p = tmp_path / "bad.yaml"
    p.write_text(evolve_yaml(trio, fitness=fitness))
    assert main(["evolve", str(p), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "r" / "history.jsonl").exists()


def test_a_heldout_split_that_overlaps_the_fitness_split_is_a_warning_with_the_count(trio, tmp_path, capsys):
    fitness = (f"    tasks: [{DATA / 'capitals_choice.jsonl'}]\n"
               f"    heldout: [{DATA / 'capitals_choice.jsonl'}]\n")
    p = tmp_path / "overlap.yaml"
    p.write_text(evolve_yaml(trio, search="{popsize: 2, max_generations: 1}", fitness=fitness))
    report = evolve(p, tmp_path / "run")
    assert "warning: 6 held-out items also appear in the fitness split" in capsys.readouterr().err
    assert report.evaluations == 2
