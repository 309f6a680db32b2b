"""Shared fixtures: tiny real-architecture parents, built once per session, and an offline hub."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: huggingface_hub resolves from the local cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_parents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny multi-shard bf16 qwen3 parents (seeds 1 and 2) with tokenizer and configs.

    Session-scoped and shared: tests must treat them as read-only.
    """
    from darwin_stream.demo import build_model

    root = tmp_path_factory.mktemp("parents")
    return build_model(root / "father", seed=1), build_model(root / "mother", seed=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two parents with a tensor big enough to need many chunks under a tiny budget."""
    import json

    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(0)
    shapes = {"big.weight": (512, 96), "vec.weight": (96,), "small.weight": (7, 5)}
    dirs = []
    for k in range(2):
        d = root / f"p{k}"
        d.mkdir()
        tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        dirs.append(str(d))
    return dirs, shapes


@pytest.fixture(scope="session")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Three tiny qwen3 checkpoints: a base and two models, for evolve manifests (helpers.evolve_yaml)."""
    from darwin_stream.demo import build_model

    root = tmp_path_factory.mktemp("trio")
    return tuple(build_model(root / n, seed=s) for n, s in (("base", 11), ("a", 12), ("b", 13)))


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on a free loopback port for the session, with an empty bucket `darwin`
    (tests.s3_server). Tests write under their own prefixes."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from tests import s3_server

    server = s3_server.start()
    try:
        yield server
    finally:
        server.server.stop()
