"""`darwin-stream methods [NAME ...]`: the merge methods and their parameters, from the registry.

What a manifest may write under `parameters:` is exactly what the registry declares (anything else
is refused by the planner), so the listing is read from the registry rather than from a doc that
could drift from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import TYPE_CHECKING, Any

from darwin_stream.errors import ManifestError

if TYPE_CHECKING:
    from darwin_stream.methods import MergeMethod


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="METHOD",
                        help="show only these methods (default: all of them)")
    parser.add_argument("--json", action="store_true", help="print the methods as one JSON object")


def _value(v: Any) -> Any:
    from darwin_stream.methods import REQUIRED  # imports torch: not while building the parser

    return "required" if v is REQUIRED else v


def summary(method: MergeMethod) -> str:
    """The first paragraph of the docstring of the module that registered `method`, without its
    leading `name / other_name:`."""
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("darwin_stream.methods.") and \
                any(v is method for v in vars(mod).values()):
            text = " ".join((mod.__doc__ or "").strip().split("\n\n")[0].split())
            head, sep, rest = text.partition(": ")
            return rest if sep and method.name in head.replace(" / ", " ").split() else text
    return getattr(method, "description", "")


def describe(method: MergeMethod) -> dict[str, Any]:
    return {
        "name": method.name,
        "summary": summary(method),
        "needs_base": method.needs_base,
        "random": method.random,
        "model_parameters": {k: _value(v) for k, v in method.model_param_defaults.items()},
        "parameters": {k: _value(v) for k, v in method.param_defaults.items()},
    }


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} ({v})" if v == "required" else f"{k} = {json.dumps(v)}"
                     for k, v in params.items()) or "none"


def format_method(d: dict[str, Any]) -> str:
    needs = ["needs base_model" if d["needs_base"] else "", "random: reproducible from darwin.seed" if d["random"] else ""]
    lines = [d["name"], *textwrap.wrap(d["summary"], 100, initial_indent="  ", subsequent_indent="  ")]
    if any(needs):
        lines.append("  " + "; ".join(n for n in needs if n))
    lines.append(f"  per model:    {_params(d['model_parameters'])}")
    lines.append(f"  method-level: {_params(d['parameters'])}")
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
