"""`darwin-stream score MODEL [MODEL ...] --tasks T.jsonl [...]`: score checkpoints or manifests.

Every MODEL shares one engine: the first starts it, each later one is swapped in (a checkpoint) or
bred in place (a merge or breed manifest, never written to disk). The lead's CLI calls `configure`
and `run`; `python -m darwin_stream.score.cli` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from darwin_stream.errors import DarwinError, ScoreError
from darwin_stream.score.backend import BACKENDS, open_backend, resolve_model
from darwin_stream.score.child import DTYPES
from darwin_stream.score.run import score_child
from darwin_stream.score.tasks import load_task
from darwin_stream.score.vllm_backend import DEFAULT_MAX_MODEL_LEN


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="checkpoint directory, repo id, or merge/breed manifest (.yaml: bred in place)")
    parser.add_argument("--tasks", nargs="+", required=True, metavar="TASK.jsonl",
                        help="task files, one JSON object a line (docs/scoring.md; examples in "
                             "darwin_stream/score/data/)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="vllm (default when installed) or hf (transformers)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model, one per line")
    parser.add_argument("--details", metavar="FILE", help="write one JSON line per item to FILE")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help=f"vllm: context length (default {DEFAULT_MAX_MODEL_LEN}, or the model's "
                             "max_position_embeddings when that is smaller)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="compute dtype; auto: float32 on a CPU without native bf16 when it fits in memory, "
                             "else bfloat16")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own INFO log (default: its warnings and errors only)")


def _default_backend() -> str:
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def _human(rec: dict[str, Any]) -> str:
    lines = [f"{rec['model']}  fitness {rec['fitness']:.4f}  ({rec['backend']}, {rec['seconds']:.2f} s)"]
    for name, r in rec["tasks"].items():
        lines.append(f"  {name:<24} {r['kind']:<10} {r['metric']:<14} {r['score']:.4f}  n={r['n']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Score every MODEL; print results as they come. Exits the process directly after a vLLM run.

    vLLM's engine processes sometimes crash while the interpreter tears them down ("terminate called
    without an active exception", exit 134) after every result has been printed. A finished
    evaluation must not become a failed command, so after a vLLM run the engine is shut down
    explicitly, output is flushed, and the process ends with os._exit(0). Set
    `args.hard_exit = False` to get the return code instead (in-process callers).
    """
    name = args.backend or _default_backend()
    tasks = [load_task(t) for t in args.tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ScoreError(f"two tasks share a name: {names}; give one a 'name' option in its header line")
    # Resolve every model before starting an engine: a typo should cost a second, not 30.
    children = [(spec, resolve_model(spec)) for spec in args.models]
    options: dict[str, Any] = {"dtype": getattr(args, "dtype", "auto")}
    if name == "vllm" and args.max_model_len:
        options["max_model_len"] = args.max_model_len
    details = open(args.details, "w", encoding="utf-8") if args.details else None  # noqa: SIM115
    t0 = time.perf_counter()
    backend = open_backend(name, children[0][1], verbose=getattr(args, "verbose", False), **options)
    print(f"darwin-stream score: {name} engine ready in {time.perf_counter() - t0:.1f} s "
          f"(computing in {str(backend.dtype).removeprefix('torch.')})", file=sys.stderr)
    try:
        for i, (spec, child) in enumerate(children):
            load_s = backend.load(child)["seconds"] if i else 0.0
            res = score_child(backend, tasks)
            rec = {"model": spec, "backend": name, "tasks": res["tasks"], "fitness": res["fitness"],
                   "seconds": load_s + res["seconds"]}
            print(json.dumps(rec) if args.json else _human(rec), flush=True)
            if details:
                for d in res["details"]:
                    details.write(json.dumps({"model": spec, **d}) + "\n")
                details.flush()
    finally:
        if details:
            details.close()
        backend.close()
    if name == "vllm" and getattr(args, "hard_exit", True):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darwin-stream score", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DarwinError as e:
        print(f"darwin-stream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # vLLM starts its engine with spawn: the entry point must be guarded
    sys.exit(main())
