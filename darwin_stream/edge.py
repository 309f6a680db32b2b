"""The library's edges: what third-party code raises there becomes one of darwin-stream's errors.

A leaf beside errors.py (which must stay import-free, tests/test_imports.py): this module also
needs hints.py, to turn an ImportError into the pip command that fixes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from darwin_stream.errors import DarwinError, DependencyError, StorageError
from darwin_stream.hints import missing_dependency

# Packages whose own exceptions are I/O failures met at the edges (object stores, the Hub, HTTP).
_CLIENT_PACKAGES = frozenset({"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "requests",
                              "urllib3", "huggingface_hub", "fsspec"})


def _os_message(e: OSError) -> str:
    name = e.filename if e.filename is not None else ""
    return f"{e.strerror or e}: {name}".rstrip(": ") if e.strerror else str(e)


@contextlib.contextmanager
def at_edge(what: str) -> Iterator[None]:
    """Turn an OSError or a storage client's error raised inside into a one-line `StorageError`.

    Library entry points run inside this, so a pipeline sees one hierarchy; `what` names the call
    ("merge", "ingest"...). DarwinErrors, KeyboardInterrupt and bugs pass through unchanged.
    """
    try:
        yield
    except DarwinError:
        raise
    except ImportError as e:
        hint = missing_dependency(e)
        if hint is None:
            raise
        raise DependencyError(f"{what}: {hint}") from e
    except OSError as e:
        raise StorageError(f"{what}: {_os_message(e)}") from e
    except Exception as e:
        if type(e).__module__.split(".")[0] not in _CLIENT_PACKAGES:
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        raise StorageError(f"{what}: {type(e).__name__}: {first}") from e
