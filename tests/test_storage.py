"""Storage options: the layers they come from, the CLI's JSON, and the model card's redaction."""

from __future__ import annotations

import pytest
import yaml

from darwin_stream import storage
from darwin_stream.errors import ManifestError


def test_later_layers_win_key_by_key_and_nested_options_merge():
    manifest = {"endpoint_url": "http://a", "client_kwargs": {"region_name": "eu-west-1", "verify": False}}
    cli = {"client_kwargs": {"region_name": "us-east-1"}, "key": "k"}
    got = storage.combine(manifest, None, cli)
    assert got == {"endpoint_url": "http://a", "key": "k",
                   "client_kwargs": {"region_name": "us-east-1", "verify": False}}
    assert manifest["client_kwargs"]["region_name"] == "eu-west-1"  # the layers are not modified


@pytest.mark.parametrize(("text", "needle"), [("{bad", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_cli_json_that_is_not_an_object_is_one_line(text, needle):
    with pytest.raises(ManifestError, match=needle) as e:
        storage.parse_json(text)
    assert "\n" not in str(e.value)


def test_a_card_never_shows_storage_options_and_other_manifests_are_untouched():
    plain = "# a comment\nmerge_method: linear\nmodels:\n  - model: a\n"
    assert storage.redact(plain) == plain
    secret = plain + "darwin:\n  memory_budget: 1GiB\n  storage_options: {key: AKIA123, secret: s3cr3t}\n"
    card = storage.redact(secret)
    assert "AKIA123" not in card and "s3cr3t" not in card
    doc = yaml.safe_load(card)
    assert doc["darwin"]["memory_budget"] == "1GiB" and set(doc["darwin"]["storage_options"]) == {"key", "secret"}
    assert storage.from_manifest_text(secret) == {"key": "AKIA123", "secret": "s3cr3t"}
