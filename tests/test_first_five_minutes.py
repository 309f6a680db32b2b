"""Executable docs: every shell block of README.md and docs/*.md runs as written.

Every ```bash block is run, in order, by one shell with `set -e`, in a scratch copy of the files the
commands name (manifests/, the shipped task files), after `source .venv/bin/activate` puts a
`darwin-stream` on PATH. Blocks marked ```bash illustration (or needs-demo) are not run, nor the
README's two opening set-up commands (CI runs those itself, and tests/test_demo.py runs the demo).
The parents stand in for what `darwin-stream demo` builds: demo-out/base, parent_a, parent_b (tiny
Qwen3 models; the real ones take minutes to train).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```", re.S | re.M)


def shell_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks that are not marked illustration (or needs-demo: those need
    the demo's trained parents and task files, which take minutes to build)."""
    return [body for lang, rest, body in FENCE.findall(text)
            if lang == "bash" and not {"illustration", "needs-demo"} & set(rest.split())
            and "tools/setup.sh" not in body]


def all_blocks() -> list[str]:
    return [b for doc in DOCS for b in shell_blocks(doc.read_text())]


def test_blocks_are_found_and_illustrations_skipped():
    blocks = all_blocks()
    assert len(blocks) >= 6
    assert not any("s3://" in b for b in blocks)
    assert "s3://" in (ROOT / "README.md").read_text()
    assert not any("tools/setup.sh" in b for b in blocks)


@pytest.fixture
def scratch(tmp_path, tiny_parents):
    from darwin_stream.demo import build_model

    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    shutil.copytree(ROOT / "darwin_stream" / "score" / "data", tmp_path / "darwin_stream" / "score" / "data")
    shutil.copytree(tiny_parents[0], tmp_path / "demo-out" / "base")
    shutil.copytree(tiny_parents[1], tmp_path / "demo-out" / "parent_a")
    build_model(tmp_path / "demo-out" / "parent_b", seed=3)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (("darwin-stream", f'{sys.executable} -m darwin_stream.cli'), ("python", sys.executable)):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path


@pytest.mark.slow
def test_first_five_minutes_runs_as_written(scratch):
    script = "set -eo pipefail\nset -x\n" + "\n".join(all_blocks())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=scratch, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    assert "darwin-stream " in out and "predicted peak memory" in out
    assert "peak private memory" in out and re.search(r"^exported: \S*out/roundtrip ", out, re.M)
    assert "is below the" in r.stderr  # the 1KiB budget was refused, naming the minimum
    assert "Traceback" not in r.stderr
    for child in ("slerp", "ties", "bred", "child", "roundtrip"):
        assert (scratch / "out" / child / "config.json").is_file(), child
