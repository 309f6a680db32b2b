"""Hub errors say what was looked for, where, and why: offline, unreachable, or no such repo."""

from __future__ import annotations

import pytest
from huggingface_hub import errors

from darwin_stream.errors import SourceError
from darwin_stream.pool import open_parent
from darwin_stream.sources import hub_failure


def test_offline_names_the_repo_the_cache_and_that_the_machine_is_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError) as e:
        open_parent("darwin/not-cached@v2")
    msg = str(e.value)
    assert "\n" not in msg
    assert "darwin/not-cached@v2" in msg and str(tmp_path / "hub") in msg
    assert "offline" in msg and "HF_HUB_OFFLINE=1" in msg


def test_online_failures_say_why_not_just_the_class_name():
    unreachable = hub_failure("org/name", None, "/c", False, errors.LocalEntryNotFoundError("long text"))
    assert "could not be reached" in unreachable and "/c" in unreachable
    assert "LocalEntryNotFoundError" not in unreachable
    other = hub_failure("org/name", "main", "/c", False, ValueError("first line\nsecond"))
    assert other.endswith("(cache /c; ValueError: first line)") and "org/name@main" in other
