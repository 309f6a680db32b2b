"""Architecture adapters: tensor name -> (layer, canonical role), per architecture.

Roles let a manifest speak about "attention" or "the FFN" the same way on every architecture, and let
breeding line up tensors of parents that name them differently. `filter:` values from mergekit YAML
(self_attn, mlp, input_layernorm, ...) resolve through roles too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Canonical roles. A role belongs to one group; mergekit-style filters name either.
ROLE_GROUPS: dict[str, str] = {
    "embed": "embed",
    "per_layer_embed": "embed",
    "lm_head": "lm_head",
    "final_norm": "norm",
    "attn_q": "self_attn",
    "attn_k": "self_attn",
    "attn_v": "self_attn",
    "attn_o": "self_attn",
    "attn_q_norm": "self_attn",
    "attn_k_norm": "self_attn",
    "linear_attn": "self_attn",
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp",
    "ffn_up": "mlp",
    "ffn_down": "mlp",
    "moe_router": "mlp",
    "moe_expert": "mlp",
    "layer_other": "layer_other",
    "other": "other",
}


@dataclass(frozen=True)
class TensorRole:
    layer: int | None
    role: str

    @property
    def group(self) -> str:
        return ROLE_GROUPS[self.role]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def classify(name: str, config: dict | None = None) -> TensorRole:
    """Fallback pattern classifier; architecture adapters refine it (see arch/ modules)."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    rules = [
        ("embed_tokens_per_layer", "per_layer_embed"),
        ("embed_tokens", "embed"),
        ("lm_head", "lm_head"),
        ("q_norm", "attn_q_norm"),
        ("k_norm", "attn_k_norm"),
        ("q_proj", "attn_q"),
        ("k_proj", "attn_k"),
        ("v_proj", "attn_v"),
        ("o_proj", "attn_o"),
        ("linear_attn", "linear_attn"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "attn_post_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "ffn_post_norm"),
        ("gate_proj", "ffn_gate"),
        ("up_proj", "ffn_up"),
        ("down_proj", "ffn_down"),
    ]
    for needle, role in rules:
        if needle in name:
            return TensorRole(layer, role)
    if layer is None and name.endswith("norm.weight"):
        return TensorRole(None, "final_norm")
    return TensorRole(layer, "layer_other" if layer is not None else "other")


def matches_filter(name: str, role: TensorRole, filter_: str) -> bool:
    """mergekit's substring rule, widened so that group and role names work on every architecture."""
    return filter_ in name or filter_ == role.group or filter_ == role.role
