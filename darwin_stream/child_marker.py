"""How a child in a bucket says it is complete, and how a reader refuses one that is not.

An object store has no rename, so a bucket child (`object_sink.ObjectSink`) cannot be built aside
and moved into place like a local one. Instead its shards stay uncompleted multipart uploads
(invisible) until every part is in, and a journal object beside the child,
`<prefix>/.<name>.partial/darwin-journal.json`, records the uploads while it is being made. When
all shards are completed and the inherited files written, the marker `<child>/.darwin-complete` is
written last and the journal removed.

A reader therefore refuses a URL location that has a journal beside it and no marker: a merge into
it was interrupted (or is running, or is replacing it), and what is there may be a mix. A
checkpoint uploaded by other means has neither, and is read as before.
"""

from __future__ import annotations

import posixpath
from typing import Any

from darwin_stream.errors import SourceError

MARKER = ".darwin-complete"  # inside the child, written last
JOURNAL = "darwin-journal.json"  # inside the child's sibling `.<name>.partial/`


def partial_prefix(path: str) -> str:
    """`bucket/dir/.child.partial` for `bucket/dir/child` (no protocol, no trailing slash)."""
    head, name = posixpath.split(path.rstrip("/"))
    return posixpath.join(head, f".{name}.partial")


def journal_path(path: str) -> str:
    return posixpath.join(partial_prefix(path), JOURNAL)


def marker_path(path: str) -> str:
    return posixpath.join(path.rstrip("/"), MARKER)


def is_incomplete(fs: Any, path: str) -> bool:
    """Whether `path` (on fsspec filesystem `fs`) is a darwin-stream bucket child still unfinished."""
    try:
        return bool(fs.exists(journal_path(path))) and not fs.exists(marker_path(path))
    except OSError:
        return False  # cannot look: opening the parent itself will say why


def refuse_incomplete(fs: Any, path: str, spec: str) -> None:
    """One line for a reader (a parent, `score`) pointed at an unfinished bucket child."""
    if is_incomplete(fs, path):
        raise SourceError(
            f"parent {spec}: an incomplete darwin-stream child (its completion marker {MARKER} is missing: "
            "a merge into it was interrupted or is still running); run that merge again to finish it")


def refuse_incomplete_url(spec: str, storage_options: dict | None = None) -> None:
    """`refuse_incomplete` for a URL, its filesystem from fsspec (and its configuration)."""
    import fsspec  # the fsspec stack is only needed when a URL is read

    try:
        fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
    except (ImportError, ValueError):
        return  # not a filesystem fsspec can open: the reader's own error names it
    refuse_incomplete(fs, path, spec)
