"""Errors that reach the user as one line, in one hierarchy rooted at `DarwinError`.

Every failure a user can cause (bad YAML, a missing parent, a corrupt shard, a full disk) is raised
as a `DarwinError` subclass; the CLI prints its message alone and exits 2, and a pipeline catches
`DarwinError` (or one subclass) without ever seeing a bare `Exception`, `ValueError` or a client
library's own error. Anything else is a bug and keeps its traceback.

    DarwinError
     +-- ManifestError     the YAML is malformed or names something invalid
     +-- SourceError       a parent cannot be found, opened or trusted
     +-- PlanError         valid YAML that cannot be planned against these parents
     +-- OptionError       a run option (device, format, scheduler) is invalid
     |    +-- BudgetError  the memory budget is below what the plan needs
     +-- StoreError        a zarr layer store is missing, corrupt or unsafe
     +-- OutputError       an output would clobber an input, is locked, or has no room
     +-- StorageError      bytes could not be read or written (OSError, object-store client errors)
     +-- DependencyError   an optional extra is not installed (also an ImportError)
     +-- ScoreError        a task file or scoring backend is unusable
     +-- EvolveError       an evolution cannot start or resume

`edge.at_edge` turns what the library meets at its edges (OSError, client errors) into these.
docs/library.md shows each one raised by a realistic bad input (tests/test_library.py checks it).
"""


class DarwinError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ManifestError(DarwinError):
    """The manifest YAML is malformed or names something invalid."""


class SourceError(DarwinError):
    """A parent cannot be found, opened or trusted (missing, truncated, pickle-only...)."""


class PlanError(DarwinError):
    """The manifest is valid but cannot be planned against these parents (shapes, missing tensors)."""


class OptionError(DarwinError):
    """A run option given to a command or library call is invalid (device, format, scheduler address)."""


class BudgetError(OptionError):
    """The memory budget is below the smallest one the plan can run within (the message names it)."""


class StoreError(DarwinError):
    """A zarr layer store is missing, corrupt, or would be written outside its root."""


class OutputError(DarwinError):
    """An output would overwrite or contain an input, is held by another writer, or has no room."""


class StorageError(DarwinError):
    """Bytes could not be read or written: permission denied, disk full, a dropped connection.

    Raised at the library's edges in place of the OSError or the object-store client's error, which
    stays attached as `__cause__` for a pipeline that wants to retry on a particular errno.
    """


class DependencyError(DarwinError, ImportError):
    """An optional extra that this call needs is not installed; the message says how to install it."""


class ScoreError(DarwinError):
    """A task file or a scoring backend cannot be used (bad JSONL, an engine that cannot start)."""


class EvolveError(DarwinError):
    """An evolution cannot start or resume: a gene that names nothing, a run dir of another manifest."""
