"""Rows of remote parents kept on local disk for the tasks that read them again.

A method with a tensor-wide statistic (slerp, model_stock, ties, della, karcher...) reads a tensor
that spans several tasks once per statistic pass (the partial tasks of engine.build_graph) and once
more to blend it. For a local parent that re-read is a view of the page cache and costs nothing;
for an `s3://` parent every read is a ranged GET, and the merge of the 0.6B pair fetched 1.261x the
bytes it needed (its 622 MB embedding twice), a 70B merge would fetch 1.98x (docs/scaling.md). So
the first task that fetches a remote input's rows writes them to a spill file, the later passes
read them from there, and the blend task, the last reader, takes them and deletes the file.

    spill(run)        this process's spill of run `run` (made on first use; None once closed)
    close_run(run)    remove this process's spill directory of `run`, returning its stats
    is_remote(p)      whether a parent's re-read costs a fetch (URL shards, URL stores)

Spill files are raw rows as fetched (the stored dtype; float32 for a gathered vocabulary), read
back into a buffer of the same size as the fetch made, so a task holds what it held before and
`engine.bytes_in_flight` stays true; the bytes on disk go through the page cache, not the budget.
A spill is one directory per run and per process (`tempfile`'s directory, or /var/tmp when that is a
tmpfs, whose pages would be memory outside the budget), mode 0700, files named by a digest (a
tensor name never becomes a path), removed when the run ends, failed or not (engine.run).

Disk: the spill holds the rows of the split tensors whose statistic has started and whose blends
have not run. dask's ordering finishes a tensor's partial -> state -> blend chain before it starts
many others, so that is about one tensor of both parents at a time: measured, 622 MB at the peak
on the 0.6B pair (its embedding, the one tensor split there), and in dask's order of a slerp of two
70B-shaped parents (the graph run with its tasks replaced by recorders) 4.2 GB with one worker and
4.5 GB with four (an embedding or lm_head, 128256 x 8192 of both parents, is 4.2 GB). The spill
never exceeds `limit_bytes` (16 GiB, or half the free space of its filesystem when the run starts,
if less); a task whose rows would not fit simply does not keep them, and they are fetched again
(correct, only more bytes), as they are when a write fails (ENOSPC). A file lives from its
tensor's first pass to its blend, seconds, so with memory to spare the kernel drops most of it
before writing it back (30 s of dirty age by default). A run killed outright leaves its directory
behind; the next run on the machine removes the ones whose process is gone.

On a dask.distributed cluster each worker process keeps its own spill: a later pass or a blend that
runs on another worker than the task that fetched the rows finds nothing and fetches them again
(correct, only more bytes: if the scheduler places a blend independently of where its rows were
kept, about 1 - 1/W of a split tensor's bytes are fetched twice on W workers; not measured), and
what the first worker kept stays on its disk, up to its limit, until the end of the run
(`engine.run` calls `close_run` on every worker, as it releases their parents).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass

import torch

from darwin_stream.sources import LoraParent, Parent, SafetensorsParent

SPILL_CAP = 16 * 2**30  # bytes: far above the few tensors a run keeps at once (see the module doc)
PREFIX = "darwin-stream-reread-"
_MEMORY_FS = frozenset({"tmpfs", "ramfs"})


def is_remote(parent: Parent) -> bool:
    """Whether reading `parent`'s rows again costs a fetch: shards behind a URL (file:// aside),
    a store behind a URL, a LoRA parent whose base or adapter is one."""
    if isinstance(parent, LoraParent):
        return is_remote(parent.base) or is_remote(parent.adapter)
    if isinstance(parent, SafetensorsParent) and parent.is_local:
        return False
    spec = parent.spec
    return "://" in spec and not spec.startswith("file://")


@dataclass
class SpillStats:
    kept: int = 0  # entries written
    kept_bytes: int = 0
    reused_bytes: int = 0  # bytes read back instead of fetched
    peak_bytes: int = 0  # most bytes on disk at once
    skipped_bytes: int = 0  # bytes not kept: over the limit, or a failed write

    def to_dict(self) -> dict:
        return asdict(self)


class Spill:
    """One run's spill files in this process: put by the first reader, taken by the later ones."""

    def __init__(self, directory: str, limit_bytes: int):
        self.directory = directory
        self.limit_bytes = limit_bytes
        self.stats = SpillStats()
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], tuple, int]] = {}
        self._bytes = 0
        self._writing = 0  # puts in progress: `close` waits for them before removing the directory
        self._closed = False
        self._cond = threading.Condition()

    def _path(self, key: tuple) -> tuple[str, str]:
        digest = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
        return digest, os.path.join(self.directory, digest)

    def put(self, key: tuple, data: torch.Tensor, meta: tuple = ()) -> bool:
        """Keep `data` (and `meta`, returned with it) under `key`; False when it was not kept."""
        digest, path = self._path(key)
        nbytes = data.numel() * data.element_size()
        with self._cond:
            if self._closed or digest in self._entries:
                return False
            if self._bytes + nbytes > self.limit_bytes:
                self.stats.skipped_bytes += nbytes
                return False
            self._bytes += nbytes
            self._writing += 1
        ok = False
        try:
            ok = _write(path, _byte_view(data))
        finally:
            with self._cond:
                self._writing -= 1
                if ok:
                    self._entries[digest] = (data.dtype, tuple(data.shape), meta, nbytes)
                    self.stats.kept += 1
                    self.stats.kept_bytes += nbytes
                    self.stats.peak_bytes = max(self.stats.peak_bytes, self._bytes)
                else:
                    self._bytes -= nbytes
                    self.stats.skipped_bytes += nbytes
                self._cond.notify_all()
        return ok

    def get(self, key: tuple, *, drop: bool = False) -> tuple[torch.Tensor, tuple] | None:
        """What `put` kept under `key` (a new tensor) and its meta, or None; `drop`: the last
        reader, whose read removes the file."""
        digest, path = self._path(key)
        with self._cond:
            entry = self._entries.pop(digest, None) if drop else self._entries.get(digest)
        if entry is None:
            return None
        dtype, shape, meta, nbytes = entry
        out = torch.empty(shape, dtype=dtype)
        ok = _read(path, _byte_view(out), nbytes)
        if not ok and not drop:  # unreadable: forget it, and the caller fetches
            with self._cond:
                drop = self._entries.pop(digest, None) is not None
        if drop:
            with self._cond:
                self._bytes -= nbytes
            _unlink(path)
        if not ok:
            return None
        with self._cond:
            self.stats.reused_bytes += nbytes
        return out, meta

    def close(self) -> SpillStats:
        """Remove every file and the directory, once the puts in progress are done."""
        with self._cond:
            self._closed = True
            while self._writing:
                self._cond.wait()
            self._entries.clear()
            self._bytes = 0
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.stats


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _write(path: str, data: memoryview) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False  # the run is closing (directory gone), or the disk refuses: fetch again later
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        return True
    except OSError:
        _unlink(path)
        return False
    finally:
        os.close(fd)


def _read(path: str, out: memoryview, nbytes: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        done = 0
        while done < nbytes:
            n = os.readv(fd, [out[done:]])
            if n <= 0:
                return False
            done += n
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- runs in this process ------------------------------------------------------------------------

_spills: dict[str, Spill] = {}
_closed: set[str] = set()  # runs ended here: a task still finishing must not open a new directory
_lock = threading.Lock()


def _fs_type(path: str) -> str:
    """The filesystem type `path` lies on, from /proc/self/mounts ('' when it cannot be told)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return ""
    return kind


def spill_root() -> str | None:
    """Where spills go: tempfile's directory (TMPDIR), or /var/tmp when that is a tmpfs (its pages
    are memory, outside the budget); None when both are memory."""
    for d in (tempfile.gettempdir(), "/var/tmp"):
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK) and _fs_type(d) not in _MEMORY_FS:
            return d
    return None


def limit_for(directory: str) -> int:
    """The spill's limit: SPILL_CAP, or half the free space of its filesystem now, if less."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return min(SPILL_CAP, st.f_bavail * st.f_frsize // 2)


def _sweep(root: str) -> None:
    """Remove the spills of this user's processes that are gone: a run killed outright (SIGKILL, a
    lost node) cannot remove its own. One in another pid namespace may look gone; removing it
    costs that run only fetches (its reads find nothing, its writes fail)."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive under another user (EPERM), or unreadable


def spill(run: str) -> Spill | None:
    """This process's spill of `run`, made on first use; None once the run is closed here, or
    where no directory will take it."""
    s = _spills.get(run)
    if s is not None:
        return s
    with _lock:
        s = _spills.get(run)
        if s is None and run not in _closed:
            root = spill_root()
            if root is None:
                _closed.add(run)
                return None
            _sweep(root)
            try:
                directory = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)
            except OSError:
                _closed.add(run)
                return None
            s = _spills[run] = Spill(directory, limit_for(root))
    return s


def close_run(run: str) -> dict:
    """End `run` in this process: its spill directory removed, its stats returned (as a dict, which
    dask.distributed sends back from a worker)."""
    with _lock:
        _closed.add(run)
        s = _spills.pop(run, None)
    return s.close().to_dict() if s is not None else SpillStats().to_dict()
