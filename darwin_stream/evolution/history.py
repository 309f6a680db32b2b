"""The run directory: what the search depends on (run.json) and every candidate so far (history.jsonl).

A run directory is input to a resume, like a parent, so nothing in it is unpickled: the ES state is
rebuilt by replaying history.jsonl into a fresh `cma` instance (search.Search.replay). Each
candidate is one JSON line, appended and fsynced before the next candidate starts, so a SIGKILL
loses at most the candidate being scored; a torn last line (killed mid-write) is dropped on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from darwin_stream.errors import EvolveError

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
MAX_HISTORY_BYTES = 256 * 2**20  # 100k candidates of a 1k-gene genome; anything larger is not ours
MAX_RUN_BYTES = 2**20


def digest(obj: Any) -> str:
    """A short content hash of JSON-able data (keys sorted), for the per-field fingerprint."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass
class Candidate:
    generation: int
    index: int  # position within its generation
    genome: list[float]
    fitness: float  # on what the search scores (the subset, in subset mode)
    tasks: dict[str, float]
    plan_s: float = 0.0
    breed_s: float = 0.0
    score_s: float = 0.0
    cached: bool = False  # the same genome was scored before: its result was reused
    full_fitness: float | None = None  # subset mode: fitness on the full set, where rescored

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class RunDir:
    """One evolution's directory. `open` claims it for a fingerprint, or refuses, naming the field."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY_FILE

    def _read_run(self) -> dict[str, Any] | None:
        p = self.path / RUN_FILE
        if not p.exists():
            return None
        if not p.is_file() or p.stat().st_size > MAX_RUN_BYTES:
            raise EvolveError(f"{p}: not a run file of darwin-stream evolve")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise EvolveError(f"{p}: unreadable run file; remove the run directory or pick another --run-dir") from None
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), dict):
            raise EvolveError(f"{p}: not a run file of darwin-stream evolve")
        return data

    def open(self, fingerprint: dict[str, str], *, resume: bool, manifest: str) -> list[Candidate]:
        """Claim the directory; return the recorded candidates (empty for a new run)."""
        if self.path.exists() and not self.path.is_dir():
            raise EvolveError(f"run directory {self.path} exists and is not a directory")
        run = self._read_run() if self.path.is_dir() else None
        if run is None:
            if self.path.is_dir() and any(self.path.iterdir()):
                raise EvolveError(f"run directory {self.path} is not empty and holds no evolve run; pick another --run-dir")
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_run({"fingerprint": fingerprint, "manifest": manifest})
            return []
        old = run["fingerprint"]
        changed = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
        if changed:
            if resume:
                raise EvolveError(f"cannot resume {self.path}: the manifest changed in a way that alters the search "
                                  f"({', '.join(changed)}); start a new run with another --run-dir")
            raise EvolveError(f"run directory {self.path} belongs to another manifest ({run.get('manifest', '?')}; "
                              f"differs in {', '.join(changed)}); pick another --run-dir")
        history = self.read_history()
        if not resume and history:
            raise EvolveError(f"run directory {self.path} already holds {len(history)} candidates of this manifest; "
                              "pass --resume to continue it, or pick another --run-dir")
        return history

    def _write_run(self, data: dict[str, Any]) -> None:
        tmp = self.path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / RUN_FILE)

    def read_history(self) -> list[Candidate]:
        p = self.history_path
        if not p.exists():
            return []
        if p.stat().st_size > MAX_HISTORY_BYTES:
            raise EvolveError(f"{p}: larger than {MAX_HISTORY_BYTES >> 20} MiB; not a history of this tool")
        raw = p.read_bytes()
        lines = raw.split(b"\n")
        out: list[Candidate] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                c = Candidate.from_dict(d)
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                if i == len(lines) - 1:
                    break  # the last line was being written when the run was killed
                raise EvolveError(f"{p}:{i + 1}: not a candidate record; the history is damaged") from None
            out.append(c)
        if raw and not raw.endswith(b"\n"):
            self._truncate_to_complete(raw)
        return out

    def _truncate_to_complete(self, raw: bytes) -> None:
        """Drop a torn last line so that the next append starts on a fresh line."""
        keep = raw[: raw.rfind(b"\n") + 1]
        with open(self.history_path, "r+b") as f:
            f.truncate(len(keep))

    def append(self, c: Candidate) -> None:
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(c.to_line() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, history: list[Candidate]) -> None:
        """Replace the history (to record full-set rescores) atomically."""
        tmp = self.path / f".{HISTORY_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for c in history:
                f.write(c.to_line() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.history_path)
