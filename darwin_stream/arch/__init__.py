"""Architecture adapters: tensor name -> (layer, canonical role), per architecture.

Roles let a manifest speak about "attention" or "the FFN" the same way on every architecture, and let
breeding line up tensors of parents that name them differently. `filter:` values from mergekit YAML
(self_attn, mlp, input_layernorm, ...) resolve through roles too.
"""

from __future__ import annotations

from dataclasses import dataclass

# Canonical roles. A role belongs to one group; mergekit-style filters name either.
ROLE_GROUPS: dict[str, str] = {
    "embed": "embed",
    "per_layer_embed": "embed",
    "per_layer_proj": "embed",  # Gemma4's model-level projection into the per-layer inputs
    "lm_head": "lm_head",
    "final_norm": "norm",
    "attn_q": "self_attn",
    "attn_k": "self_attn",
    "attn_v": "self_attn",
    "attn_o": "self_attn",
    "attn_q_norm": "self_attn",
    "attn_k_norm": "self_attn",
    "attn_qkv": "self_attn",  # phi3's fused q/k/v
    "attn_other": "self_attn",
    "linear_attn": "self_attn",  # Qwen3.5 Gated DeltaNet layers: all their tensors
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_post_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp",
    "ffn_up": "mlp",
    "ffn_down": "mlp",
    "ffn_gate_up": "mlp",  # phi3's fused gate/up
    "moe_router": "mlp",
    "moe_expert": "mlp",
    "moe_norm": "mlp",  # Gemma4 MoE block's extra norms: exist only with the experts
    "per_layer_input": "per_layer_input",  # Gemma4: per-layer input gate and projection
    "per_layer_input_norm": "per_layer_input",
    "layer_scalar": "layer_other",  # Gemma4's per-layer output scale
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


def adapter_for(config: dict | None):
    """The architecture adapter a config.json selects (the pattern adapter when none matches)."""
    from darwin_stream.arch.adapters import detect

    return detect(config)


def classify(name: str, config: dict | None = None) -> TensorRole:
    """(layer, role) of a tensor, read by the adapter that `config` selects.

    Without a config the pattern adapter answers, which is right for every llama/qwen/gemma name
    except llama's `post_attention_layernorm` (really the pre-FFN norm).
    """
    layer, role = adapter_for(config).classify(name)
    return TensorRole(layer, role)


def matches_filter(name: str, role: TensorRole, filter_: str) -> bool:
    """mergekit's substring rule, widened so that group and role names work on every architecture."""
    return filter_ in name or filter_ == role.group or filter_ == role.role


def layer_count(config: dict | None) -> int | None:
    from darwin_stream.arch.adapters import text_config

    n = text_config(config).get("num_hidden_layers")
    return int(n) if n is not None else None


def role_table(parent) -> list[tuple[str, TensorRole]]:
    """Every tensor of an open parent with its role, in (layer, role order, name) order."""
    order = {r: i for i, r in enumerate(ROLE_GROUPS)}
    rows = [(n, classify(n, parent.config)) for n in parent.tensors]
    big = 1 << 30
    return sorted(rows, key=lambda r: (big if r[1].layer is None else r[1].layer, order.get(r[1].role, 0), r[0]))


def inspect(model_spec: str, *, layers: list[int] | None = None) -> str:
    """A plain-text role table: which adapter reads the model, then each tensor's layer, role and shape.

    Why a table and not JSON: it is for a person checking that a new architecture's tensors land in the
    roles a breed section will blend; `--json` in the CLI gives the machine form.
    """
    from darwin_stream import pool  # the pool opens stores through zarr: only for `inspect`
    from darwin_stream.arch.adapters import text_config

    parent = pool.get_parent(model_spec)
    cfg = parent.config
    tc = text_config(cfg)
    adapter = adapter_for(cfg)
    lines = [
        f"model: {model_spec}",
        f"adapter: {adapter.name}   model_type: {cfg.get('model_type')}   architectures: {', '.join(cfg.get('architectures') or [])}",
        f"layers: {tc.get('num_hidden_layers')}   hidden: {tc.get('hidden_size')}   intermediate: {tc.get('intermediate_size')}"
        f"   activation: {tc.get(adapter.activation_key, tc.get('hidden_act', tc.get('hidden_activation')))}",
    ]
    if tc.get("layer_types"):
        kinds: dict[str, int] = {}
        for k in tc["layer_types"]:
            kinds[k] = kinds.get(k, 0) + 1
        lines.append("layer_types: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    lines.append("")
    lines.append(f"{'layer':>5}  {'role':<22} {'group':<26} {'dtype':<5} {'shape':<16} name")
    for name, r in role_table(parent):
        if layers is not None and r.layer not in layers:
            continue
        info = parent.tensors[name]
        layer = "-" if r.layer is None else str(r.layer)
        shape = "x".join(str(s) for s in info.shape) or "scalar"
        lines.append(f"{layer:>5}  {r.role:<22} {r.group:<26} {info.dtype:<5} {shape:<16} {name}")
    return "\n".join(lines)
