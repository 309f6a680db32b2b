"""tools/setup.sh picks torch's source to fit the machine, and says which (dry run: nothing installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "tools" / "setup.sh"


def _dry(tmp_path: Path, *, local_wheels: bool, gpu: bool) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"DARWIN_SETUP_DRY_RUN": "1"}
    if local_wheels:
        env["PIP_FIND_LINKS"] = str(tmp_path / "wheels")
        env["PIP_NO_INDEX"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf is not the machine under test
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    smi = fake_bin / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: test'\n")
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    # PATH keeps python3 and bash, drops any real nvidia-smi
    dirs = [str(fake_bin)] + [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    env["PATH"] = os.pathsep.join(dirs)
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True, exist_ok=True)
    shutil.copy(SETUP, repo / "tools" / "setup.sh")
    r = subprocess.run(["bash", str(repo / "tools" / "setup.sh"), "test"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["tools"]  # a dry run creates no .venv
    return r.stdout, r.stderr


@pytest.mark.slow
def test_cpu_machine_without_a_local_wheel_takes_the_cpu_index(tmp_path):
    out, err = _dry(tmp_path, local_wheels=False, gpu=False)
    assert "torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" in out
    assert "CPU build" in err


@pytest.mark.slow
def test_cuda_machine_takes_the_default_build(tmp_path):
    out, err = _dry(tmp_path, local_wheels=False, gpu=True)
    assert "install -q --disable-pip-version-check torch==2.13.0\n" in out and "--index-url" not in out
    assert "CUDA" in err


@pytest.mark.slow
def test_a_local_wheel_wins(tmp_path):
    """A wheel pip can find without an index: copied from this machine's, when it has one."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    found = sorted(Path("/opt/wheels").glob("torch-2.13.0*.whl")) if Path("/opt/wheels").is_dir() else []
    if not found:
        pytest.skip("no torch 2.13.0 wheel on this machine to stand in for a local one")
    (wheels / found[0].name).symlink_to(found[0])
    out, err = _dry(tmp_path, local_wheels=True, gpu=True)
    assert "torch==2.13.0\n" in out and "--index-url" not in out
    assert "the wheel on this machine" in err
