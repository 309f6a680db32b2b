"""What a parent is, for the runs that read it: where its bytes live and a digest of its content.

A resumed merge reuses the chunks a killed run wrote, and a re-run ingest reuses arrays already
copied; both must notice a parent that changed in place in between, or the result mixes old and
new bytes with exit 0. Paths alone do not tell, so `parent_identity` digests what is cheap to read
and changes whenever the content does:

  * local safetensors: each shard's header bytes, size, mtime_ns, ctime_ns and inode (one stat and
    one header read per shard, bytes already in the page cache from opening the parent);
  * URLs: each shard's ETag / version id / modification time and size as the filesystem reports
    them, plus the tensor table parsed from the headers;
  * stores: the root index with its per-tensor checksums, and for a reference store the size and
    mtime_ns of every shard it points into (its checksums may have been skipped at ingest); the
    store parent says so itself (`Parent.identity_parts`, store/parent.py), so this module does
    not import store/.

`parent_locations` lists what a run reads, so that no output can land on it (see outputs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from darwin_stream.sources import MAX_HEADER_BYTES, LoraParent, Parent, SafetensorsParent

if TYPE_CHECKING:
    from darwin_stream.plan import Plan

_URL_KEYS = ("ETag", "etag", "VersionId", "version_id", "LastModified", "last_modified", "mtime", "created", "size")


def _digest(obj: object) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _table(parent: Parent) -> list:
    return [[t.name, t.dtype, list(t.shape), t.file, t.offset, t.nbytes] for t in parent.tensors.values()]


def _local_shard(path: str) -> list:
    st = os.stat(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        body = f.read(min(n, MAX_HEADER_BYTES))
    # ctime and inode too: a write with the old mtime put back (`touch -d`, a restore) still moves
    # ctime, and a file renamed over the shard is another inode. Both move on a chmod as well,
    # which costs a needless restart, the safe way round.
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return [path, *stamp, hashlib.blake2b(head + body, digest_size=16).hexdigest()]


def _url_shard(parent: SafetensorsParent, url: str) -> list:
    try:
        info = parent.fs.info(url)  # type: ignore[union-attr]
    except Exception:  # remote backends raise their own types; no identity is then "unknown"
        return [url, None]
    return [url, {k: str(info[k]) for k in _URL_KEYS if k in info}]


def parent_identity(parent: Parent) -> str:
    """A digest that changes whenever the parent's tensors can have changed (see the module doc)."""
    if isinstance(parent, SafetensorsParent):
        files = sorted({t.file for t in parent.tensors.values()})
        if parent.is_local:
            return _digest(["local", [_local_shard(f) for f in files]])
        return _digest(["url", _table(parent), [_url_shard(parent, f) for f in files]])
    if isinstance(parent, LoraParent):  # a changed base or a changed adapter changes the rows
        return _digest(["lora", parent_identity(parent.base), parent_identity(parent.adapter)])
    return _digest(parent.identity_parts())  # stores (store/parent.py) and any other form


def plan_identities(plan: Plan, get: Callable[[str], Parent]) -> dict[str, str]:
    """`parent_identity` of every parent of the plan, by key; `get` gives the open parent of a spec
    (`pool.get_parent`)."""
    return {key: parent_identity(get(spec)) for key, spec in plan.parents.items()}


def parent_locations(parent: Parent) -> set[str]:
    """Everything a run reads of this parent, as paths or URLs: its directory or store, its shards
    (resolved, so a hub snapshot's blobs count) and the shards a reference store points into."""
    out = {parent.spec}
    if isinstance(parent, LoraParent):
        return parent_locations(parent.base) | parent_locations(parent.adapter)
    if isinstance(parent, SafetensorsParent):
        out.add(parent.root)
        for f in {t.file for t in parent.tensors.values()}:
            out.add(f)
            if parent.is_local:
                out.add(os.path.realpath(f))
    else:
        out |= parent.locations()  # a store: itself and the shards a reference store points into
    return {p for p in out if "://" in p or os.path.exists(p) or os.path.isabs(p)}


def plan_locations(plan: Plan, get: Callable[[str], Parent]) -> set[str]:
    out: set[str] = set()
    for spec in plan.parents.values():
        out |= parent_locations(get(spec))
    return out
