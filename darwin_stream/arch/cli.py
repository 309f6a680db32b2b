"""`darwin-stream inspect MODEL`: the role table a breed section is written against."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a parent: local directory (or any spec darwin-stream opens)")
    parser.add_argument("--layer", type=int, action="append", help="show only this layer (repeatable)")
    parser.add_argument("--adapters", help="a YAML file of adapters for architectures darwin-stream does not know")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    from darwin_stream import arch

    if args.adapters:
        from darwin_stream.arch.adapters import register_adapters

        register_adapters(args.adapters)
    if not args.json:
        print(arch.inspect(args.model, layers=args.layer))
        return 0
    from darwin_stream import pool

    parent = pool.get_parent(args.model)
    rows = [
        {"name": n, "layer": r.layer, "role": r.role, "group": r.group,
         "shape": list(parent.tensors[n].shape), "dtype": parent.tensors[n].dtype}
        for n, r in arch.role_table(parent)
        if args.layer is None or r.layer in args.layer
    ]
    print(json.dumps({"adapter": arch.adapter_for(parent.config).name, "tensors": rows}, indent=1))
    return 0
