"""Errors that reach the user as one line.

Every failure a user can cause (bad YAML, a missing parent, a corrupt shard) is raised as a
`DarwinError`; the CLI prints its message alone and exits non-zero. Anything else is a bug and
keeps its traceback.
"""


class DarwinError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ManifestError(DarwinError):
    """The manifest YAML is malformed or names something invalid."""


class SourceError(DarwinError):
    """A parent cannot be found, opened or trusted (missing, truncated, pickle-only...)."""


class PlanError(DarwinError):
    """The manifest is valid but cannot be planned against these parents (shapes, missing tensors)."""


class StoreError(DarwinError):
    """A zarr layer store is missing, corrupt, or would be written outside its root."""


class OutputError(DarwinError):
    """An output would overwrite or contain an input, is held by another writer, or has no room."""


class EvolveError(DarwinError):
    """An evolution cannot start or resume: a gene that names nothing, a run dir of another manifest."""
