"""`darwin-stream methods [NAME ...]`: the merge methods and their parameters, from the registry.

What a manifest may write under `parameters:` is exactly what each method declares (anything else
is refused by the planner), so the listing is generated from those declarations (summary,
parameters with their defaults and doc lines, base policy, arity, whether it breeds) rather than
from a doc that could drift from them.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import TYPE_CHECKING, Any

from darwin_stream.errors import ManifestError

if TYPE_CHECKING:
    from darwin_stream.methods import MergeMethod


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="METHOD",
                        help="show only these methods (default: all of them)")
    parser.add_argument("--json", action="store_true", help="print the methods as one JSON object")


def describe(method: MergeMethod) -> dict[str, Any]:
    every = (*method.model_parameters, *method.parameters)
    return {
        "name": method.name,
        "summary": method.summary,
        "needs_base": method.needs_base,
        "base": method.base.value,
        "models": method.arity.describe() if (method.arity.least, method.arity.most) != (0, None) else "any number",
        "random": method.random,
        "breeds": method.breed is not None,
        "model_parameters": {p.name: "required" if p.required else p.default for p in method.model_parameters},
        "parameters": {p.name: "required" if p.required else p.default for p in method.parameters},
        "docs": {p.name: p.doc for p in every},
    }


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} ({v})" if v == "required" else f"{k} = {json.dumps(v)}"
                     for k, v in params.items()) or "none"


# BasePolicy values, as the listing says them
_BASE = {"none": "not used (list it among the models to weigh it)", "required": "required",
         "optional": "optional", "input": "one more input, averaged with the models"}


def format_method(d: dict[str, Any]) -> str:
    lines = [d["name"], *textwrap.wrap(d["summary"], 100, initial_indent="  ", subsequent_indent="  ")]
    if d["random"]:
        lines.append("  random: reproducible from darwin.seed")
    lines.append(f"  base_model:   {_BASE[d['base']]}; models besides it: {d['models']}")
    lines.append(f"  per model:    {_params(d['model_parameters'])}")
    lines.append(f"  method-level: {_params(d['parameters'])}")
    lines += [f"    {name}: {doc}" for name, doc in d["docs"].items() if doc]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from darwin_stream import methods  # imports torch: not while building the parser

    known = methods.names()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise ManifestError(f"no merge method {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    rows = [describe(methods.get(n)) for n in (args.names or known)]
    if args.json:
        print(json.dumps({"methods": rows}, indent=1))
        return 0
    print("\n\n".join(format_method(d) for d in rows))
    print("\nPer-model parameters go under each model's `parameters:`, method-level ones under the top-level "
          "`parameters:`; any value may be a gradient or a list of filters (docs/manifest.md, docs/methods.md).")
    return 0
