"""One `s3://bucket/prefix` a child is written under: the requests both bucket sinks make.

`object_sink.ObjectSink` (a safetensors child: one multipart upload per shard) and
`zarr_sink.ZarrSink` (a zarr store: one object per chunk) share everything below their layouts:
requests through s3fs that fail in one line naming the URL, puts counted in `UploadStats`,
listings, and the journal beside the child (`child_marker.journal_path`). Nothing here knows what
the objects hold.

On a dask.distributed cluster each worker's copy of a sink counts into this process's
`UploadStats` for the run (`_stats_for`), which the client folds in after the graph ran
(`take_stats`, run on every worker).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from darwin_stream import child_marker
from darwin_stream.errors import OutputError

JOURNAL_LIMIT = 16 * 2**20  # bytes: a journal holds a fingerprint and one upload id per shard


@dataclass
class UploadStats:
    requests: int = 0  # S3 requests this run made (uploads, listings, the journal, the marker)
    parts: int = 0  # parts uploaded by this run (a zarr child: chunk objects and parts of big chunks)
    bytes_uploaded: int = 0  # bytes of all objects this run put (parts, files, index, marker, journal)
    resumed_parts: int = 0  # parts (zarr: chunks) an interrupted run had uploaded, not uploaded again
    peak_waiting: int = 0  # most bytes held at once in parts waiting for their other bytes
    spilled_bytes: int = 0  # bytes put as fragments (then read back) because waiting parts filled the reserve
    read_back_bytes: int = 0  # zarr: bytes of resumed chunks read back to checksum their tensors

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: dict[str, int]) -> None:
        """Fold in a worker process's counts (`take_stats`): sums, and the larger peak."""
        for k, v in other.items():
            setattr(self, k, max(self.peak_waiting, v) if k == "peak_waiting" else getattr(self, k) + v)


# What the sinks unpickled in this process (a dask.distributed worker) counted, per run id: each
# worker's copy of the sink is its own object, and the client folds them in after the graph ran.
_worker_stats: dict[str, UploadStats] = {}
_worker_stats_lock = threading.Lock()


def _stats_for(run_id: str) -> UploadStats:
    with _worker_stats_lock:
        return _worker_stats.setdefault(run_id, UploadStats())


def take_stats(run_id: str) -> dict[str, int]:
    """This process's counts for run `run_id`, forgotten once taken (run on every worker)."""
    with _worker_stats_lock:
        stats = _worker_stats.pop(run_id, None)
    return stats.to_dict() if stats is not None else {}


def _why(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class BucketPrefix:
    """Requests under one child's prefix; the base of the bucket sinks."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        import fsspec  # the fsspec/s3fs stack: only for a URL child

        self.url = url.rstrip("/")
        self.run_id = uuid.uuid4().hex
        self.storage_options = dict(storage_options or {})
        if not self.url.startswith("s3://"):
            raise OutputError(f"output {self.url}: only s3:// URLs (and S3-compatible stores) can hold a child")
        try:
            self._fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError, TypeError) as e:
            raise OutputError(f"output {self.url}: cannot open ({_why(e)})") from None
        self.bucket, _, self.key = path.rstrip("/").partition("/")
        if not self.key:
            raise OutputError(f"output {self.url}: give a prefix inside the bucket, e.g. {self.url}/child")
        self.journal_key = child_marker.journal_path(self.key)
        self.stats = UploadStats()
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        """The s3fs filesystem; on a worker, opened on first use from the storage options."""
        if self._fs is None:
            import fsspec  # as in __init__

            self._fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return self._fs

    def _count(self, requests: int = 1, uploaded: int = 0) -> None:
        with self._lock:
            self.stats.requests += requests
            self.stats.bytes_uploaded += uploaded

    def _call(self, method: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One S3 request through s3fs; any failure is one line naming the URL."""
        self._count()
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise OutputError(f"output {self.url}: cannot write ({method}: no such bucket or key; "
                              f"check that bucket {self.bucket!r} exists)") from None
        except Exception as e:  # botocore, aiohttp and s3fs raise many types; all mean "cannot write"
            raise OutputError(f"output {self.url}: cannot write ({method}: {_why(e)})") from None

    def _put_object(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=key, Body=data)
        with self._lock:
            self.stats.bytes_uploaded += len(data)

    def _listing(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix`: key -> size."""
        found, token = {}, None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            r = self._call("list_objects_v2", Prefix=prefix, **kw)
            found.update({o["Key"]: int(o.get("Size", 0)) for o in r.get("Contents", [])})
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return found

    def _keys(self, prefix: str) -> list[str]:
        return list(self._listing(prefix))

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a request
            self._call("delete_objects", Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]],
                                                 "Quiet": True})

    def _read_journal(self) -> dict | None:
        """The journal of an earlier run, {} when it is not one, None when there is none."""
        self._count()
        try:
            raw = self.fs.cat_file(f"{self.bucket}/{self.journal_key}", start=0, end=JOURNAL_LIMIT + 1)
        except FileNotFoundError:
            return None
        except Exception as e:  # as in _call
            raise OutputError(f"output {self.url}: cannot read its journal ({_why(e)})") from None
        try:
            journal = json.loads(raw) if len(raw) <= JOURNAL_LIMIT else None
        except ValueError:
            journal = None
        return journal if isinstance(journal, dict) else {}
