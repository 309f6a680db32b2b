"""Which tensors a live model must breed again between two plan children (pure plan logic)."""

from __future__ import annotations

import dataclasses

from darwin_stream.plan import Plan, SourceRef, TensorPlan
from darwin_stream.score.breeding import changed_tensors


def _plan(t: dict[str, float], parents: dict[str, str] | None = None) -> Plan:
    tensors = [
        TensorPlan(name=name, shape=(4, 4), dtype="BF16", method="slerp",
                   models=(SourceRef("a", name), SourceRef("b", name)), params={"t": v},
                   base=SourceRef("a", name))
        for name, v in t.items()
    ]
    return Plan(parents=parents or {"a": "/p/a", "b": "/p/b"}, tensors=tensors, config_from="a", tokenizer_from="a")


def _names(tps: list[TensorPlan]) -> list[str]:
    return [tp.name for tp in tps]


def test_nothing_bred_yet_means_every_tensor():
    new = _plan({"x": 0.1, "y": 0.2})
    assert _names(changed_tensors(None, new)) == ["x", "y"]


def test_an_equal_plan_changes_nothing():
    assert changed_tensors(_plan({"x": 0.1, "y": 0.2}), _plan({"x": 0.1, "y": 0.2})) == []


def test_only_the_tensor_whose_params_moved():
    assert _names(changed_tensors(_plan({"x": 0.1, "y": 0.2, "z": 0.3}), _plan({"x": 0.1, "y": 0.25, "z": 0.3}))) == ["y"]


def test_seed_and_model_params_count():
    old = _plan({"x": 0.1, "y": 0.2})
    new = dataclasses.replace(old, tensors=[dataclasses.replace(old.tensors[0], seed=7),
                                            dataclasses.replace(old.tensors[1], model_params=({"weight": 1.0}, {}))])
    assert _names(changed_tensors(old, new)) == ["x", "y"]


def test_same_key_naming_another_parent_is_a_change():
    old = _plan({"x": 0.1})
    assert _names(changed_tensors(old, _plan({"x": 0.1}, {"a": "/p/a", "b": "/p/other"}))) == ["x"]


def test_a_tensor_new_to_the_plan_is_bred():
    assert _names(changed_tensors(_plan({"x": 0.1}), _plan({"x": 0.1, "w": 0.5}))) == ["w"]


def test_a_snapshot_does_not_follow_edits_in_place():
    from darwin_stream.score.breeding import snapshot

    live = _plan({"x": 0.1, "y": 0.2})
    old = snapshot(live)
    live.tensors[1].params["t"] = 0.9  # a template writing the next genome into the same dicts
    assert _names(changed_tensors(old, live)) == ["y"]
    assert changed_tensors(live, live) == []  # what diffing against the live object itself would say
