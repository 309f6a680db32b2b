"""Built-in architecture adapters and the YAML loader for user-declared ones.

An adapter is data, not code: a list of regexes over the part of a tensor name that follows its layer
prefix (`model.layers.7.` or, in multimodal checkpoints, `model.language_model.layers.7.`), each
naming a canonical role. Keeping it as data is what lets a user add an architecture in YAML with the
same power as a built-in one.

Why names alone are not enough: llama-style models call their pre-FFN norm `post_attention_layernorm`,
while Gemma 2/3/4 use the same name for a norm on the attention output and have a separate
`pre_feedforward_layernorm`. Breeding a Gemma father with a Qwen mother must line up the FFN norms by
what they do, so the role of that name depends on the architecture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darwin_stream.errors import ManifestError

# Where the text decoder's layers live: text-only (`model.layers.N.`), multimodal HF layout
# (`model.language_model.layers.N.`) and the older llava-style layout (`language_model.model.layers.N.`).
TEXT_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)"
LAYER_RE = TEXT_PREFIX + r"layers\.(\d+)\.(.+)"

# Tensors of the text model outside its layers, after the text prefix.
GLOBAL_RULES: list[tuple[str, str]] = [
    (TEXT_PREFIX + r"embed_tokens\.weight", "embed"),
    (TEXT_PREFIX + r"embed_tokens_per_layer\.weight", "per_layer_embed"),
    (TEXT_PREFIX + r"per_layer_model_projection\.weight", "per_layer_proj"),
    (TEXT_PREFIX + r"per_layer_projection_norm\.weight", "per_layer_proj"),
    (TEXT_PREFIX + r"norm\.weight", "final_norm"),
    (r"(?:language_model\.)?lm_head\.weight", "lm_head"),
]

# Rules shared by every transformer block; first match wins, so the specific ones come first.
_ATTN = [
    (r"self_attn\.q_norm\.", "attn_q_norm"),
    (r"self_attn\.k_norm\.", "attn_k_norm"),
    (r"self_attn\.qkv_proj\.", "attn_qkv"),
    (r"self_attn\.q_proj\.", "attn_q"),
    (r"self_attn\.k_proj\.", "attn_k"),
    (r"self_attn\.v_proj\.", "attn_v"),
    (r"self_attn\.o_proj\.", "attn_o"),
    (r"self_attn\..+", "attn_other"),
    (r"linear_attn\..+", "linear_attn"),
]
_FFN = [
    (r"mlp\.experts\..+", "moe_expert"),
    (r"mlp\.shared_experts?\..+", "moe_expert"),
    (r"mlp\.shared_expert_gate\..+", "moe_router"),
    (r"mlp\.gate\.(weight|bias)", "moe_router"),
    (r"mlp\.gate_up_proj\.", "ffn_gate_up"),
    (r"mlp\.gate_proj\.", "ffn_gate"),
    (r"mlp\.up_proj\.", "ffn_up"),
    (r"mlp\.down_proj\.", "ffn_down"),
    (r"experts\..+", "moe_expert"),
    (r"router\..+", "moe_router"),
]
_LLAMA_NORMS = [
    (r"input_layernorm\.", "attn_norm"),
    (r"post_attention_layernorm\.", "ffn_norm"),  # llama's "post attention" norm is the pre-FFN norm
]
_GEMMA_NORMS = [
    (r"input_layernorm\.", "attn_norm"),
    (r"post_attention_layernorm\.", "attn_post_norm"),
    (r"pre_feedforward_layernorm_2\.", "moe_norm"),
    (r"post_feedforward_layernorm_[12]\.", "moe_norm"),
    (r"pre_feedforward_layernorm\.", "ffn_norm"),
    (r"post_feedforward_layernorm\.", "ffn_post_norm"),
]
_GEMMA4_EXTRA = [
    (r"per_layer_input_gate\.", "per_layer_input"),
    (r"per_layer_projection\.", "per_layer_input"),
    (r"post_per_layer_input_norm\.", "per_layer_input_norm"),
    (r"layer_scalar", "layer_scalar"),
]


@dataclass
class Adapter:
    """How one architecture names its tensors.

    `norm_offset`: the RMSNorm computes x * (1 + w) (Gemma 2/3, Qwen3.5) rather than x * w; two parents
    that differ here have norm weights on different scales, which breeding must warn about.
    """

    name: str
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()  # class names in config.json `architectures`, prefix match
    layer_rules: list[tuple[str, str]] = field(default_factory=list)
    global_rules: list[tuple[str, str]] = field(default_factory=lambda: list(GLOBAL_RULES))
    layer_re: str = LAYER_RE
    norm_offset: bool = False
    activation_key: str = "hidden_act"

    def __post_init__(self) -> None:
        self._layer = re.compile(self.layer_re)
        self._rules = [(re.compile(p), r) for p, r in self.layer_rules]
        self._globals = [(re.compile(p), r) for p, r in self.global_rules]

    def classify(self, name: str) -> tuple[int | None, str]:
        """(layer, role) of one tensor; anything outside the text layers (vision tower...) is "other"."""
        m = self._layer.fullmatch(name)
        if m:
            rest = m.group(m.lastindex or 1)
            for rx, role in self._rules:
                if rx.match(rest):
                    return int(m.group(1)), role
            return int(m.group(1)), "layer_other"
        for rx, role in self._globals:
            if rx.fullmatch(name):
                return None, role
        return None, "other"


def _llama_like(name: str, *types: str, norm_offset: bool = False) -> Adapter:
    return Adapter(name, types or (name,), layer_rules=_ATTN + _FFN + _LLAMA_NORMS, norm_offset=norm_offset)


def _gemma_like(name: str, *types: str, norm_offset: bool, extra: list | None = None) -> Adapter:
    return Adapter(
        name,
        types,
        layer_rules=_ATTN + _FFN + _GEMMA_NORMS + (extra or []),
        norm_offset=norm_offset,
        activation_key="hidden_activation",
    )


BUILTIN: list[Adapter] = [
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("qwen3_moe"),
    _llama_like("qwen3_5", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", norm_offset=True),
    _gemma_like("gemma2", "gemma2", norm_offset=True),
    _gemma_like("gemma3", "gemma3", "gemma3_text", norm_offset=True),
    _gemma_like("gemma4", "gemma4", "gemma4_text", norm_offset=False, extra=_GEMMA4_EXTRA),
    _llama_like("phi3"),
]

# The fallback for unknown architectures: substring rules over any `layers.N.` / `h.N.` / `blocks.N.`
# block outside a vision/audio tower. `post_attention_layernorm` is read the Gemma way (a norm after
# attention) because without the architecture nothing says it feeds the FFN; mergekit `filter:` values
# still match it by name.
_PATTERN_NEEDLES = [
    ("experts", "moe_expert"),
    ("router", "moe_router"),
    ("q_norm", "attn_q_norm"),
    ("k_norm", "attn_k_norm"),
    ("qkv_proj", "attn_qkv"),
    ("q_proj", "attn_q"),
    ("k_proj", "attn_k"),
    ("v_proj", "attn_v"),
    ("o_proj", "attn_o"),
    ("linear_attn", "linear_attn"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "attn_post_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "ffn_post_norm"),
    ("gate_up_proj", "ffn_gate_up"),
    ("gate_proj", "ffn_gate"),
    ("up_proj", "ffn_up"),
    ("down_proj", "ffn_down"),
    ("per_layer_input_gate", "per_layer_input"),
    ("per_layer_projection", "per_layer_input"),
    ("layer_scalar", "layer_scalar"),
]
PATTERN = Adapter(
    "pattern",
    layer_rules=[(".*" + re.escape(n), r) for n, r in _PATTERN_NEEDLES],
    global_rules=[*GLOBAL_RULES, (r"(?:.*\.)?embed_tokens\.weight", "embed"), (r"(?:.*\.)?lm_head\.weight", "lm_head")],
    layer_re=r"(?!.*(?:vision|visual|audio|multi_modal|mm_projector))(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(.+)",
)

# Adapters declared in YAML, searched before the built-ins so a user can also override one.
USER: list[Adapter] = []


def text_config(config: dict | None) -> dict:
    """The text model's config: `text_config` in multimodal checkpoints, the config itself otherwise."""
    config = config or {}
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def detect(config: dict | None) -> Adapter:
    """The adapter for a config.json: user adapters first, then model_type, then architectures."""
    config = config or {}
    types = {config.get("model_type"), text_config(config).get("model_type")} - {None}
    archs = list(config.get("architectures") or [])
    for adapter in [*USER, *BUILTIN]:
        if types & set(adapter.model_types):
            return adapter
        if any(a.startswith(p) for a in archs for p in adapter.architectures):
            return adapter
    for adapter in BUILTIN:  # e.g. "Gemma4ForConditionalGeneration" -> gemma4
        stem = adapter.name.replace("_", "").lower()
        if any(a.lower().replace("_", "").startswith(stem + "for") for a in archs):
            return adapter
    return PATTERN


# --- YAML-declared adapters --------------------------------------------------------------------


def adapter_from_dict(d: dict[str, Any]) -> Adapter:
    """One adapter from its YAML form (see docs/architectures.md); every error names the field."""
    from darwin_stream.arch import ROLE_GROUPS

    if not isinstance(d, dict) or "name" not in d:
        raise ManifestError("adapters[]: each adapter needs a `name`")
    name = str(d["name"])
    known = {"name", "model_types", "architectures", "extends", "layers", "roles", "globals", "norm_offset", "activation_key"}
    extra = set(d) - known
    if extra:
        raise ManifestError(f"adapters[{name}]: unknown field(s) {sorted(extra)}; expected some of {sorted(known)}")
    base: Adapter | None = None
    if d.get("extends"):
        base = next((a for a in [*USER, *BUILTIN, PATTERN] if a.name == d["extends"]), None)
        if base is None:
            raise ManifestError(f"adapters[{name}].extends: no adapter named {d['extends']!r}")

    def rules(field_name: str) -> list[tuple[str, str]]:
        raw = d.get(field_name) or {}
        if not isinstance(raw, dict):
            raise ManifestError(f"adapters[{name}].{field_name}: expected a mapping of regex -> role")
        out = []
        for pattern, role in raw.items():
            if role not in ROLE_GROUPS:
                raise ManifestError(f"adapters[{name}].{field_name}[{pattern!r}]: unknown role {role!r}; expected one of {sorted(ROLE_GROUPS)}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ManifestError(f"adapters[{name}].{field_name}[{pattern!r}]: bad regex ({e})") from None
            out.append((pattern, role))
        return out

    layer_re = d.get("layers") or (base.layer_re if base else LAYER_RE)
    try:
        groups = re.compile(layer_re).groups
    except re.error as e:
        raise ManifestError(f"adapters[{name}].layers: bad regex ({e})") from None
    if groups != 2:
        raise ManifestError(f"adapters[{name}].layers: expected a regex with two groups (layer index, rest of the name), got {groups}")
    as_tuple = lambda v: tuple(v) if isinstance(v, list | tuple) else ((v,) if v else ())  # noqa: E731
    return Adapter(
        name,
        model_types=as_tuple(d.get("model_types")),
        architectures=as_tuple(d.get("architectures")),
        layer_rules=rules("roles") + (base.layer_rules if base else []),
        global_rules=rules("globals") + (base.global_rules if base else list(GLOBAL_RULES)),
        layer_re=layer_re,
        norm_offset=bool(d.get("norm_offset", base.norm_offset if base else False)),
        activation_key=str(d.get("activation_key", base.activation_key if base else "hidden_act")),
    )


def register_adapters(spec: str | Path | list | dict) -> list[Adapter]:
    """Register adapters from a YAML file path, its parsed content, or a list of adapter mappings.

    The file holds either a list or a mapping with an `adapters:` list. Later registrations win, so a
    manifest can refine an adapter declared in a shared file.
    """
    import yaml

    data: Any = spec
    if isinstance(spec, str | Path):
        path = Path(spec)
        if not path.is_file():
            raise ManifestError(f"adapters: no such file {str(path)!r}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ManifestError(f"adapters: {path} is not valid YAML ({e.__class__.__name__})") from None
    if isinstance(data, dict):
        data = data.get("adapters", [data] if "name" in data else None)
    if not isinstance(data, list):
        raise ManifestError("adapters: expected a list of adapters (or a mapping with an `adapters:` list)")
    new = [adapter_from_dict(d) for d in data]
    names = {a.name for a in new}
    USER[:] = [a for a in USER if a.name not in names]
    USER[:0] = new
    return new
