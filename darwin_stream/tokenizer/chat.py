"""Chat templates: mergekit's rule for `chat_template` (a shipped name, auto, or Jinja text).

The named templates are darwin-stream's own text for the formats mergekit 0.1.5 ships under those
names. Each renders what mergekit's file renders (checked against mergekit 0.1.5's files on a few
conversations), except exaone: mergekit's file renders its own indentation into the prompt
("        [|system|]..."), and this one renders the format without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from darwin_stream.manifest import CHAT_TEMPLATE_NAMES

_TRIM = "{{- message['content'] | trim -}}"

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system is defined -%}"
        "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- ' [INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] + eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- (systems | last).content | trim if systems else '' -}}{{- '\\n\\n' -}}"
        "{%- for message in messages -%}"
        "{%- set head = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'}"
        ".get(message['role']) -%}"
        "{%- if head -%}{{- head + '\\n' -}}" + _TRIM + "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
        "{{- '[|' + message['role'] + '|]' + message['content'] -}}"
        "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}
assert tuple(sorted(TEMPLATES)) == CHAT_TEMPLATE_NAMES


def template_of(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t.strip() if isinstance(t, str) and t.strip() else None


def resolve(setting: str | None, tokenizers: Iterable[Any]) -> str | None:
    """The template text a child gets: None keeps the tokenizer's own. `auto` is the template most
    of the parents share (ties go to the earlier parent, base first, then manifest order; mergekit
    breaks them in the order of a Python set), or none when no parent has one."""
    if setting is None:
        return None
    if setting == "auto":
        found = [t for t in (template_of(tok) for tok in tokenizers if tok is not None) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return TEMPLATES.get(setting, setting)
