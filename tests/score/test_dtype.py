"""Which dtype a scorer computes in: `auto` trades bf16 for float32 only where that is faster and fits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from darwin_stream.score.child import resolve_dtype, weight_bytes


@pytest.fixture
def child(tmp_path):
    save_file({"w": torch.zeros(1024, 512, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_weight_bytes_counts_the_shards(child):
    assert 1024 * 512 * 2 <= weight_bytes(child) < 1024 * 512 * 2 + 4096  # tensor bytes plus the header


@pytest.mark.parametrize("requested", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_is_kept(child, requested):
    assert resolve_dtype(requested, child, on_gpu=False, has_bf16=False, available=2**40) == requested


def test_auto_keeps_bf16_where_it_is_native(child):
    assert resolve_dtype("auto", child, on_gpu=True, has_bf16=False, available=2**40) == "bfloat16"
    assert resolve_dtype("auto", child, on_gpu=False, has_bf16=True, available=2**40) == "bfloat16"


def test_auto_takes_float32_on_a_cpu_without_bf16_when_it_fits(child):
    f32 = 2 * weight_bytes(child)
    assert resolve_dtype("auto", child, on_gpu=False, has_bf16=False, available=3 * f32 + 1) == "float32"
    assert resolve_dtype("auto", child, on_gpu=False, has_bf16=False, available=3 * f32) == "bfloat16"
