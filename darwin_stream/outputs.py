"""Where a command writes, checked against what it reads, and held by one writer at a time.

Every command that writes (merge, ingest, export) goes through this module before its first
write:

  * `output_paths(out)` resolves the output (a symlink is followed: the result is written at its
    target, the link is left alone) and names the temporaries beside it. Every temporary name is
    derived from the output's name alone, never from a pid, so that a re-run finds what a killed
    run left and reuses or cleans it;
  * `check_not_input(out, inputs)` refuses an output that is, lies inside, or contains an input:
    `merge --overwrite` onto a parent's directory used to delete the parent;
  * `OutputLock` holds an flock on `.NAME.lock` beside the output for the whole command, so a
    second writer stops with the holder's pid instead of deleting the first one's temporaries. The
    kernel drops the lock when its process dies, so a lock left by a killed run is simply taken;
  * `check_free_space` compares the bytes still to write with what the filesystem has left.

Locations are compared as strings after resolution: local paths by `os.path.realpath`, URLs
(`s3://bucket/key`) as written, without a trailing slash. `file://` URLs are local paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from darwin_stream.errors import OutputError

STAMP = ".darwin-plan"  # a temporary directory of darwin-stream's own making holds this file


def location(path: str | os.PathLike) -> str:
    """A comparable form of a local path or URL: symlinks resolved, no trailing slash."""
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://"):]
    if "://" in p:
        proto, _, rest = p.partition("://")
        return f"{proto}://{rest.rstrip('/')}"
    return os.path.realpath(os.path.abspath(os.path.expanduser(p)))


def _inside(child: str, ancestor: str) -> bool:
    return child.startswith(ancestor.rstrip("/") + "/")


@dataclass(frozen=True)
class OutputPaths:
    """An output and the temporaries a command keeps beside it, all named after it."""

    final: Path  # resolved: a symlinked output is written at its target

    @property
    def tmp(self) -> Path:
        return self.final.parent / f".{self.final.name}.partial"

    @property
    def old(self) -> Path:
        return self.final.parent / f".{self.final.name}.old"

    @property
    def lock(self) -> Path:
        return self.final.parent / f".{self.final.name}.lock"

    def all(self) -> list[Path]:
        return [self.final, self.tmp, self.old, self.lock]


def output_paths(out: str | os.PathLike) -> OutputPaths:
    return OutputPaths(Path(location(out)))


def check_not_input(outputs: Iterable[str | os.PathLike], inputs: Iterable[str], what: str = "output") -> None:
    """Refuse any output location that equals an input, lies inside one, or contains one.

    `inputs` are `location()`s: parent directories, their shard files (resolved, so a hub snapshot's
    blobs count), store files and the files a reference store points at.
    """
    ins = sorted({location(i) for i in inputs})
    for out in outputs:
        o = location(out)
        for i in ins:
            if o == i:
                raise OutputError(f"{what} {o} is an input of this run ({i}); refusing to write over it")
            if _inside(o, i):
                raise OutputError(f"{what} {o} lies inside input {i}; write it somewhere else")
            if _inside(i, o):
                raise OutputError(f"{what} {o} contains input {i}; writing it would destroy that input")


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """One line, before any write, when the filesystem cannot hold the `needed` bytes still to write."""
    if needed <= 0:
        return
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # not a local filesystem we can ask: the writes themselves will tell
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise OutputError(f"not enough space in {directory} for {what}: {_gib(needed)} needed, {_gib(free)} free")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


class OutputLock:
    """An exclusive flock on `path`, held for the life of a command; the file records the holder's pid.

    flock locks belong to the open file and die with the process, so a lock file left by a killed
    run is taken over at once. On release the file is removed while still locked; a process that
    opened the old file before that notices (its inode is no longer the path's) and retries.
    """

    def __init__(self, path: str | os.PathLike, output: str | os.PathLike):
        self.path, self.output = Path(path), output
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"output {self.output} is being written by process {holder} "
                                      f"(lock {self.path}); wait for it or stop it") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # the holder released and removed it while we waited: take the new one
        raise OutputError(f"output {self.output}: could not take lock {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(paths: OutputPaths, output: str | os.PathLike | None = None) -> OutputLock:
    return OutputLock(paths.lock, output if output is not None else paths.final)


def clear_temporary(tmp: Path, stamp: str = STAMP) -> None:
    """Remove a temporary of ours that a killed run left; refuse to delete anything else.

    Called under the output's lock, so no live run owns it. A directory that holds files but no
    stamp is not of darwin-stream's making (a user's directory that happens to have the name).
    """
    if not tmp.exists() and not tmp.is_symlink():
        return
    if tmp.is_symlink() or not tmp.is_dir():
        raise OutputError(f"{tmp} is in the way of the output and is not a darwin-stream temporary; move it away")
    if not (tmp / stamp).is_file() and any(tmp.iterdir()):
        raise OutputError(f"{tmp} is in the way of the output and is not a darwin-stream temporary; move it away")
    shutil.rmtree(tmp)


def remove(path: Path) -> None:
    """Remove a file, a link or a directory tree (the previous output being replaced)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
