"""Real models: the transformers backend, and real vLLM (one engine per session; see conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from darwin_stream.score.backend import open_backend
from darwin_stream.score.run import score_child
from darwin_stream.score.tasks import load_task
from darwin_stream.score.worker import iter_dir, tensor_digest

from .conftest import DATA

PROMPTS = ["the quick brown fox", "paris is the capital of", "one two three"]


def _ids(backend, texts):
    return [backend.tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def hf_father(demo):
    backend = open_backend("hf", str(demo["father"]), dtype="bfloat16")
    yield backend
    backend.close()


def _choice_tasks(tmp_path):
    """The example choice task twice: once scored by acc (sum), once by acc_norm (mean)."""
    lines = (DATA / "capitals_choice.jsonl").read_text().splitlines()
    head = json.loads(lines[0])
    head["task"].update(name="capitals_sum", metric="acc")
    p = tmp_path / "sum.jsonl"
    p.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    return [load_task(DATA / "capitals_choice.jsonl"), load_task(p), load_task(DATA / "corpus_perplexity.jsonl")]


@pytest.mark.slow
def test_hf_scores_all_kinds(hf_father):
    tasks = [load_task(p) for p in sorted(DATA.glob("*.jsonl"))]
    res = score_child(hf_father, tasks)
    assert set(res["tasks"]) == {"capitals", "qa", "corpus"}
    assert 0 < res["tasks"]["corpus"]["score"] <= 1
    assert 0 <= res["fitness"] <= 1
    assert len(res["details"]) == sum(len(t.items) for t in tasks)


@pytest.mark.slow
def test_hf_plan_child_equals_disk_child(demo, plan, merged_child, hf_father):
    """Bred in this process from the plan == loaded from the disk merge, logprob for logprob."""
    seqs = _ids(hf_father, PROMPTS)
    bred = open_backend("hf", plan, dtype="bfloat16")
    disk = open_backend("hf", str(merged_child), dtype="bfloat16")
    assert bred.token_logprobs(seqs) == disk.token_logprobs(seqs)
    assert bred.token_logprobs(seqs) != hf_father.token_logprobs(seqs)


@pytest.mark.slow
def test_hf_cli_json_and_details(demo, tmp_path, capsys):
    import argparse

    from darwin_stream.score import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    details = tmp_path / "details.jsonl"
    args = parser.parse_args([str(demo["father"]), str(demo["mother"]), "--tasks",
                              *map(str, sorted(DATA.glob("*.jsonl"))), "--backend", "hf", "--json",
                              "--details", str(details)])
    assert cli.run(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in recs] == [str(demo["father"]), str(demo["mother"])]
    for r in recs:
        assert set(r) == {"model", "backend", "tasks", "fitness", "seconds"} and r["backend"] == "hf"
        for t in r["tasks"].values():
            assert set(t) == {"kind", "metric", "score", "n"}
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == 2 * (6 + 3 + 3)
    kinds = {r["task"]: r for r in rows}
    assert {"task", "index", "choice_logprobs"} <= set(kinds["capitals"])
    assert {"task", "index", "output", "correct"} <= set(kinds["qa"])
    assert {"task", "index", "logprob", "tokens"} <= set(kinds["corpus"])


# ---- real vLLM ------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_reload_from_disk_switches_models(demo, vllm_backend):
    seqs = _ids(vllm_backend, PROMPTS)
    vllm_backend.load(str(demo["father"]))
    a = vllm_backend.generate(seqs, 8, [])
    a_lp = vllm_backend.token_logprobs(seqs)
    vllm_backend.load(str(demo["mother"]))
    b_lp = vllm_backend.token_logprobs(seqs)
    vllm_backend.load(str(demo["father"]))
    assert vllm_backend.generate(seqs, 8, []) == a
    assert vllm_backend.token_logprobs(seqs) == a_lp != b_lp


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_bred_in_place_equals_disk_merge(plan, merged_child, vllm_backend):
    """The worker's bred tensors are bit-identical to `darwin-stream merge`'s, and so are the outputs."""
    info = vllm_backend.load(plan, digests=True)
    disk = {name: tensor_digest(t) for name, t in iter_dir(merged_child)}
    assert info["tensors"] == len(disk)
    assert info["digests"] == disk
    seqs = _ids(vllm_backend, PROMPTS)
    bred_out, bred_lp = vllm_backend.generate(seqs, 12, []), vllm_backend.token_logprobs(seqs)
    vllm_backend.load(str(merged_child))
    assert vllm_backend.generate(seqs, 12, []) == bred_out
    assert vllm_backend.token_logprobs(seqs) == bred_lp


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_and_hf_agree(demo, tmp_path, vllm_backend, hf_father):
    """Per-choice log-likelihoods within 0.02 (bf16), equal accuracies, close perplexity."""
    tasks = _choice_tasks(tmp_path)
    vllm_backend.load(str(demo["father"]))
    v, h = score_child(vllm_backend, tasks), score_child(hf_father, tasks)
    worst = 0.0
    for dv, dh in zip(v["details"], h["details"], strict=True):
        if "choice_logprobs" in dv:
            for x, y in zip(dv["choice_logprobs"], dh["choice_logprobs"], strict=True):
                worst = max(worst, abs(x - y))
    print(f"worst |vllm - hf| per-choice log-likelihood: {worst:.5f}")
    assert worst < 0.02, worst
    for name in ("capitals", "capitals_sum"):
        assert v["tasks"][name]["score"] == h["tasks"][name]["score"]
    assert v["tasks"]["corpus"]["score"] == pytest.approx(h["tasks"]["corpus"]["score"], rel=0.01)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_cli_manifest_first_then_checkpoint(demo, plan, tmp_path):
    """The real command in a subprocess: an engine started from a manifest (skeleton + breeding),
    a checkpoint swapped in after it, JSON lines out, and exit code 0 (not 134) at the end."""
    details = tmp_path / "d.jsonl"
    cmd = [sys.executable, "-m", "darwin_stream.score.cli", str(demo["manifest"]), str(demo["father"]),
           "--tasks", str(DATA / "capitals_choice.jsonl"), str(DATA / "qa_generate.jsonl"),
           "--backend", "vllm", "--json", "--details", str(details), "--max-model-len", "512"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["model"] for x in recs] == [str(demo["manifest"]), str(demo["father"])]
    assert all(x["backend"] == "vllm" and set(x["tasks"]) == {"capitals", "qa"} for x in recs)
    assert len(details.read_text().splitlines()) == 2 * (6 + 3)
