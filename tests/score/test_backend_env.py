"""vLLM is quiet by default: its log goes to stderr at WARNING unless --verbose asks for INFO."""

from __future__ import annotations

import builtins
import importlib.util
import os
import subprocess
import sys

import pytest

from darwin_stream import errors
from darwin_stream.score import backend
from darwin_stream.score.cli import configure

from .conftest import DATA


def test_vllm_environment_is_quiet_unless_verbose():
    quiet, loud = backend.vllm_environment(), backend.vllm_environment(verbose=True)
    assert quiet["VLLM_LOGGING_LEVEL"] == "ERROR" and loud["VLLM_LOGGING_LEVEL"] == "INFO"
    assert "PYTHONWARNINGS" in quiet and "PYTHONWARNINGS" not in loud
    assert quiet["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # stdout is for results (--json lines)


def test_open_backend_sets_the_environment_before_vllm_is_imported(monkeypatch):
    """The variables are in os.environ when `import vllm` runs (here: fails), and a user's own
    setting wins unless --verbose was given on this command line."""
    seen = {}

    def fake_import(name, *args, **kwargs):
        if name == "vllm":
            seen.update({k: os.environ.get(k) for k in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM")})
            raise ImportError("no vllm here")
        return real_import(name, *args, **kwargs)

    real_import = builtins.__import__
    for key in {**backend.vllm_environment(), **backend.vllm_environment(verbose=True)}:
        monkeypatch.delenv(key, raising=False)  # open_backend sets them: restored after the test
    monkeypatch.setattr("builtins.__import__", fake_import)
    with pytest.raises(errors.DarwinError, match="pip install"):
        backend.open_backend("vllm", "some/model")
    assert seen == {"VLLM_LOGGING_LEVEL": "ERROR", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    with pytest.raises(errors.DarwinError):
        backend.open_backend("vllm", "some/model")
    assert seen["VLLM_LOGGING_LEVEL"] == "DEBUG"
    with pytest.raises(errors.DarwinError):
        backend.open_backend("vllm", "some/model", verbose=True)
    assert seen["VLLM_LOGGING_LEVEL"] == "INFO"


def test_score_has_a_verbose_flag():
    import argparse

    p = argparse.ArgumentParser()
    configure(p)
    assert p.parse_args(["m", "--tasks", "t.jsonl"]).verbose is False
    assert p.parse_args(["m", "--tasks", "t.jsonl", "--verbose"]).verbose is True


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_score_run_prints_no_info_log(demo):
    """A real `score` run: results on stdout, and no INFO or WARNING lines nor weight-loading bars from
    vLLM on stderr (there were ~70 lines)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    cmd = [sys.executable, "-m", "darwin_stream.score.cli", str(demo["father"]), "--tasks",
           str(DATA / "capitals_choice.jsonl"), "--backend", "vllm", "--json", "--max-model-len", "512"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    noisy = [line for line in r.stderr.splitlines() if " INFO " in line or " WARNING " in line
             or "Loading safetensors checkpoint shards" in line]
    assert noisy == [], noisy[:5]
    assert len(r.stdout.splitlines()) == 1
