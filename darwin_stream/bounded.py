"""Bounded, confined reads of a parent's small files (index, config, tokenizer) and their JSON.

A parent is untrusted input. Its small files are read whole, so each read is bounded before it
starts: a 3 GB sparse `model.safetensors.index.json` cost 6.5 GB of RAM before it was refused, so
the size is taken from `stat` and anything over `MAX_FILE_BYTES` is refused unread. A file must be
a regular file, and a symlink is followed only while its target stays inside the parent (a
`tokenizer.json -> ~/.ssh/id_rsa` would otherwise be copied into the child, which is then shared).

JSON is parsed with duplicate keys refused (json keeps the last one silently) and nesting bounded,
so a crafted file is a one-line `SourceError`, never a RecursionError.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
from typing import Any

from darwin_stream.errors import SourceError

# The largest index, config or tokenizer file read. Real ones: a 405B index is 0.1 MiB, the
# largest tokenizer.json we know (Gemma 3) 33 MiB; 64 MiB leaves room and bounds the damage.
MAX_FILE_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64  # configs nest 3-4 levels (text_config.rope_scaling...); 64 is far beyond
MAX_SHOWN = 80  # characters of an untrusted value an error message repeats


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxtuple, r.maxlist, r.maxdict, r.maxset = 3, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = MAX_SHOWN
    return r


_REPR = _bounded_repr()


def show(value: Any) -> str:
    """A bounded repr for error messages: never more than `MAX_SHOWN` characters, in bounded time.

    `repr()` of an untrusted value is unbounded (a YAML alias bomb expands to billions of
    elements, measured at a minute and gigabytes); reprlib stops after a few items per level.
    """
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def clip(text: str) -> str:
    """An untrusted string (a file name from an index) shown as is, cut to `MAX_SHOWN` characters."""
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def inside(path: str, root: str) -> bool:
    """True when `path`, all symlinks resolved, lies inside the directory `root` (resolved too)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def check_local_file(spec: str, path: str, confine: str, limit: int | None = MAX_FILE_BYTES) -> int:
    """The size of a parent's file, after checking that it may be read at all.

    `confine` is the directory its symlinks may not leave: the parent itself, or for a Hugging Face
    snapshot the repo's cache folder (snapshot files are symlinks into its `blobs/`).
    """
    name = os.path.basename(path)
    if not inside(path, confine):
        raise SourceError(f"parent {spec}: {name} is a symlink to {os.path.realpath(path)}, outside the parent")
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot read {name} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"parent {spec}: {name} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise SourceError(f"parent {spec}: {name} is {st.st_size} bytes, over the {limit} byte limit for such files")
    return st.st_size


def read_local(spec: str, path: str, confine: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A parent's small file, whole: confined, regular and at most `limit` bytes, even if it grows."""
    check_local_file(spec, path, confine, limit)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SourceError(f"parent {spec}: cannot read {os.path.basename(path)} ({e.strerror})") from None
    if len(data) > limit:
        raise SourceError(f"parent {spec}: {os.path.basename(path)} grew over the {limit} byte limit while read")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {show(k)}")
        out[k] = v
    return out


def _walk(value: Any, limit: int) -> tuple[int, bool]:
    """(nesting depth, whether a string holds a lone surrogate) of parsed JSON, stopping as soon as
    the depth exceeds `limit`. JSON's "\\ud800" escape parses to a string no UTF-8 stream can
    print: the error naming it would itself fail to print."""
    todo = [(value, 1)]
    deepest = 0
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest, False
        if isinstance(v, dict):
            if any(_surrogate(k) for k in v):
                return deepest, True
            todo += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            todo += [(x, d + 1) for x in v]
        elif isinstance(v, str) and _surrogate(v):
            return deepest, True
    return deepest, False


def _surrogate(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def load_json(raw: bytes, what: str, *, depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON; any problem is a `SourceError` that starts with `what`."""
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise SourceError(f"{what} is nested too deeply") from None
    except UnicodeDecodeError:
        raise SourceError(f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:  # a duplicate key
        raise SourceError(f"{what} is not valid JSON ({e})") from None
    deepest, surrogate = _walk(value, depth)
    if deepest > depth:
        raise SourceError(f"{what} is nested more than {depth} levels deep")
    if surrogate:
        raise SourceError(f"{what} is not valid JSON (a string holds a lone UTF-16 surrogate)")
    return value
