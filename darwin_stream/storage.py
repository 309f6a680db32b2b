"""Storage options for URL outputs: where they come from, and keeping them out of what is written.

Options (s3fs keywords: `key`, `secret`, `endpoint_url`, `client_kwargs`, ...) come, later ones
winning, from fsspec's own configuration (FSSPEC_S3_* variables, ~/.config/fsspec; applied by
fsspec itself), the manifest's `darwin: {storage_options: {...}}`, and `--storage-options JSON`
(or `storage_options=` in the library). They hold secrets, so they are never written anywhere: not
into the plan's options, and the model card shows a manifest that gave them with the values
replaced by a placeholder.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from darwin_stream.errors import ManifestError

REDACTED = "<not written: storage options may hold credentials>"


def parse_json(text: str, what: str = "--storage-options") -> dict[str, Any]:
    """A JSON object from the command line, or a one-line error."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{what}: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected a JSON object such as '{{\"endpoint_url\": \"...\"}}'")
    return value


def combine(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win, key by key; nested dicts (`client_kwargs`) are merged, not replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = combine(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_manifest_text(text: str) -> dict[str, Any]:
    """`darwin.storage_options` of a manifest's YAML text ({} when it gives none)."""
    if "storage_options" not in text:
        return {}
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}  # the manifest loader has already refused a malformed file
    darwin = doc.get("darwin") if isinstance(doc, dict) else None
    opts = darwin.get("storage_options") if isinstance(darwin, dict) else None
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise ManifestError("darwin.storage_options: expected a mapping of fsspec storage options")
    return opts


def redact(text: str) -> str:
    """The manifest's text for the model card: unchanged, unless it gives storage options.

    Then it is dumped again with every value of `darwin.storage_options` replaced (its comments
    are lost, its meaning is not), so that no credential reaches a card.
    """
    if not from_manifest_text(text):
        return text
    doc = yaml.safe_load(text)
    doc["darwin"]["storage_options"] = {k: REDACTED for k in doc["darwin"]["storage_options"]}
    return yaml.safe_dump(doc, sort_keys=False)
