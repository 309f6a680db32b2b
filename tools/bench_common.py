"""Measurement helpers for tools/bench.py: process-tree memory, page-cache control, the I/O floor.

They live apart from the benchmark's orchestration so that each one can be checked on its own and
reused by the other benchmark sections of docs/benchmarks.md. Only the standard library and numpy
are used: the benchmark must run from the project's own virtualenv with nothing added.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MiB = 2**20
GiB = 2**30
READ_BUFFER = 16 * MiB


def darwin_cli(root: Path) -> Path:
    """The `darwin-stream` command to measure: the checkout's .venv (what tools/setup.sh builds),
    else the one beside the running interpreter (another venv, or a worktree sharing one)."""
    own = root / ".venv" / "bin" / "darwin-stream"
    return own if own.exists() else Path(sys.executable).parent / "darwin-stream"


# --- process-tree memory, sampled like ../shared/tools/peakmem.py --------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants: workers spawned by a tool count against its memory."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) in bytes. RssAnon is what a RAM limit bites on; VmRSS also counts file
    pages mapped from disk, which the kernel can drop under pressure."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, rss


@dataclass
class Measured:
    """One command's wall time and peak memory over its process tree."""

    cmd: list[str]
    rc: int
    wall_s: float
    cpu_s: float  # user + system over the tree: robust to a machine shared with other jobs
    load_before: float  # 1-minute load average at the start: how contended the cores were
    sys_s: float  # the kernel's share of cpu_s (page faults, copies, zeroing fresh pages)
    minflt: int  # minor page faults: each one is a 4 KiB page mapped (and, if anonymous, zeroed)
    peak_anon: int
    peak_rss: int
    stdout: str
    stderr_tail: str

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        return d


def measure(cmd: Sequence[str], *, env: dict | None = None, log: Path | None = None,
            interval: float = 0.02) -> Measured:
    """Run `cmd`, sampling the process tree every `interval` seconds (peakmem.py's method).

    stdout and stderr go to files, not pipes, so that a chatty tool (progress bars) can never block
    on a full pipe and distort its own wall time. The child is reaped with wait4 so that its CPU
    time (its own and its waited-for descendants') comes back with it.
    """
    log = log or Path("/tmp/bench-measure.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env)
        peak_anon = peak_rss = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            a = r = 0
            for p in process_tree(proc.pid):
                x, y = process_memory(p)
                a += x
                r += y
            peak_anon, peak_rss = max(peak_anon, a), max(peak_rss, r)
            time.sleep(interval)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(list(cmd), proc.returncode, round(wall, 3), round(cpu, 2), round(load, 2),
                    round(usage.ru_stime, 2), usage.ru_minflt, peak_anon, peak_rss, stdout, stderr[-4000:])


# --- page cache ----------------------------------------------------------------------------------


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under the given files or directories (sorted, for a stable read order)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
    return out


def evict(paths: Iterable[Path]) -> None:
    """Drop these files' pages from the page cache (cold-cache runs), without root.

    Dirty pages cannot be dropped, so everything is synced first; POSIX_FADV_DONTNEED then frees
    the clean pages of just these files, leaving other engineers' caches alone.
    """
    os.sync()
    for f in files_under(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Fraction of the files' bytes now in the page cache (via util-linux fincore; -1 if absent)."""
    files = files_under(paths)
    total = sum(f.stat().st_size for f in files)
    if not files or total == 0:
        return 0.0
    try:
        res = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return -1.0
    return round(sum(int(x) for x in res.stdout.split()) / total, 4)


def warm(paths: Iterable[Path]) -> float:
    """Read the files once so they sit in the page cache; returns seconds taken."""
    return read_files(paths)[0]


def cache_state(state: str, paths: list[Path]) -> float:
    """Put the files into `state` ("cold" or "warm"); returns their resident fraction after.

    Dirty pages are flushed first (os.sync), so that no run pays for its predecessor's write-back.
    """
    os.sync()
    if state == "cold":
        evict(paths)
    elif resident_fraction(paths) < 0.98:
        warm(paths)
    return resident_fraction(paths)


# --- the I/O floor -------------------------------------------------------------------------------


def read_files(paths: Iterable[Path]) -> tuple[float, int]:
    """Seconds and bytes to read the files sequentially with a 16 MiB buffer: a merge's read floor."""
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in files_under(paths):
        with open(f, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                n += got
    return time.perf_counter() - t0, n


def write_file(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` to a new file and fsync it: a merge's write floor.

    The child writer fsyncs its shards before renaming them into place, so the floor does too.
    The buffer is random rather than zeros so that no layer below can shortcut the bytes.
    """
    buf = np.random.default_rng(0).integers(0, 255, READ_BUFFER, dtype=np.uint8).tobytes()
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def io_floor(parents: Sequence[Path], child_bytes: int, scratch: Path) -> dict:
    """Read the parents' bytes, then write the child's bytes, in the page-cache state as found."""
    read_s, nread = read_files(parents)
    tmp = scratch / "floor-write.tmp"
    try:
        write_s = write_file(tmp, child_bytes)
    finally:
        tmp.unlink(missing_ok=True)
    return {"read_s": round(read_s, 3), "write_s": round(write_s, 3),
            "wall_s": round(read_s + write_s, 3), "bytes_read": nread, "bytes_written": child_bytes}


def physical_floor(parents: Sequence[Path], child_bytes: int, scratch: Path, state: str) -> dict:
    """The physical I/O floor: reading the parents and writing the child at the same time, each by a
    plain tool (dd), in the page-cache state as found; the floor is the later of the two to finish.

    `io_floor` adds a buffered read to a buffered write, which a merge that overlaps reading with
    writing and writes with O_DIRECT "beats" (0.66x on the 0.6B geometry, cold): that is no floor.
    The write is `dd oflag=direct conv=fsync` (1 MiB blocks, the child's size rounded up to 1 MiB).
    The read is `dd iflag=direct` when the parents are cold; warm, a direct read would go to the disk
    past the cached pages a merge reads, so the read there is dd's plain read of those pages.
    """
    files = [str(f) for f in files_under(parents)]
    rflag = " iflag=direct" if state == "cold" else ""
    read = " && ".join(f"dd if={shlex.quote(f)} of=/dev/null bs=16M{rflag} status=none" for f in files)
    tmp = scratch / "floor-write.tmp"
    mib = -(-child_bytes // 2**20)
    write = f"dd if=/dev/zero of={shlex.quote(str(tmp))} bs=1M count={mib} oflag=direct conv=fsync status=none"
    t0 = time.perf_counter()
    procs = {"read_s": subprocess.Popen(["bash", "-c", read]), "write_s": subprocess.Popen(["bash", "-c", write])}
    done: dict[str, float] = {}
    try:
        while len(done) < len(procs):
            for key, p in procs.items():
                if key not in done and p.poll() is not None:
                    if p.returncode:
                        raise RuntimeError(f"floor: {key[:-2]} failed (rc {p.returncode})")
                    done[key] = time.perf_counter() - t0
            time.sleep(0.01)
    finally:
        tmp.unlink(missing_ok=True)
    nread = sum(Path(f).stat().st_size for f in files)
    return {"read_s": round(done["read_s"], 3), "write_s": round(done["write_s"], 3),
            "wall_s": round(max(done.values()), 3), "bytes_read": nread, "bytes_written": mib * 2**20,
            "floor": "physical", "read_direct": state == "cold"}


# --- numerics ------------------------------------------------------------------------------------


def bf16_ordinal(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> integers in float order, so |a - b| is the distance in ulps.

    Sign-magnitude to two's complement: +0 and -0 both map to 0, neighbours differ by 1.
    """
    u = bits.view(np.uint16).astype(np.int32)
    mag = u & 0x7FFF
    return np.where(u & 0x8000, -mag, mag)


def ulp_mismatch(a_bits: np.ndarray, b_bits: np.ndarray, ulps: int = 1) -> int:
    """How many elements of two bf16 tensors (as uint16/int16 bits) are more than `ulps` apart."""
    return int(np.count_nonzero(np.abs(bf16_ordinal(a_bits) - bf16_ordinal(b_bits)) > ulps))


# --- summaries -----------------------------------------------------------------------------------


def median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def dump(path: Path, obj: object) -> None:
    """Write JSON atomically, so an interrupted benchmark never leaves half a results file.

    The folder is made here: bench_writer.py died after its two-minute run on a missing
    .bench/results/ (only `bench.py run` used to create it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)
