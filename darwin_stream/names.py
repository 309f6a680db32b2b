"""Which tensor names are safe, wherever a name may end up as a path (a zarr node, a store key).

A leaf module (it imports nothing of darwin_stream): sources.py checks every name when it opens a
parent, and store/ again before it writes one, without either importing the other.
"""

from __future__ import annotations

import re

MAX_NAME_CHARS = 200  # a node name is a file name on local stores; most filesystems stop at 255 bytes
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a node name inside a store, or None when it is safe."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if "/" in name or "\\" in name:
        return "contains a path separator and would escape the store"
    if ".." in name:
        return "contains '..' and would escape the store"
    if ":" in name:
        return "contains ':' (a drive or URL prefix)"
    if _CONTROL.search(name):
        return "contains control characters"
    if name.startswith("__"):
        return "starts with '__', which zarr reserves"
    return None
