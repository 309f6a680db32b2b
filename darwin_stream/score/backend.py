"""What can be scored, and how a backend is chosen.

A child is either a checkpoint (a directory or a Hugging Face repo id: a `str`) or a merge plan (a
`Plan`, from a merge or breed manifest). Backends take either; a plan is bred into the live model
without being written anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from darwin_stream.child_marker import refuse_incomplete_url
from darwin_stream.errors import DependencyError, ScoreError
from darwin_stream.hints import install_hint as hint
from darwin_stream.hints import vllm_extra
from darwin_stream.plan import Plan
from darwin_stream.score.child import Child

BACKENDS = ("vllm", "hf")
MANIFEST_SUFFIXES = (".yaml", ".yml")


def resolve_model(spec: str) -> Child:
    """A MODEL argument -> a checkpoint spec (dir / repo id, returned as is) or a Plan (manifest)."""
    if "://" in spec:
        refuse_incomplete_url(spec)  # a bucket child whose merge has not finished
    p = Path(spec)
    if p.is_file() and p.suffix in MANIFEST_SUFFIXES:
        return plan_from_manifest(p)
    if p.is_file():
        raise ScoreError(f"{spec}: a model is a checkpoint directory, a repo id, or a .yaml manifest")
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".yaml", ".yml"))
    if looks_local and not p.exists():
        # Caught here, before an engine start (~30 s) would fail on it as an unknown repo id.
        raise ScoreError(f"{spec}: no such file or directory")
    return spec


def plan_from_manifest(path: Path) -> Plan:
    """Plan a merge or breed manifest exactly as `darwin-stream merge` would (same code path)."""
    from darwin_stream.api import load_plan

    return load_plan(path)


def install_hint() -> str:
    """How to install vLLM here: the extra that fits the machine, in the form that fits the install."""
    return hint(vllm_extra())


def vllm_environment(verbose: bool = False) -> dict[str, str]:
    """What vLLM reads from the environment at import, for a scoring run.

    vLLM logs at INFO to stdout by default: about 70 lines per `score` run, mixed into the results
    (and into `--json` lines). Results keep stdout; vLLM's log goes to stderr, errors only unless
    `verbose` (measured on the tiny demo parent: 70 lines of stderr at INFO, 30 at WARNING, most of
    them advice about this machine's build, and 10 at ERROR, the rest coming from outside its
    logger). Its engine processes inherit the environment, so this must be set before import; the
    Python warnings filter applies to those processes only (PYTHONWARNINGS is read at start-up).
    """
    env = {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "INFO" if verbose else "ERROR"}
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::UserWarning"
    if len(os.sched_getaffinity(0)) <= 2:
        # vLLM keeps one core for its scheduler process: on two cores that halves scoring and
        # in-place breeding (measured: 64 s -> 32 s per candidate, 0.6B geometry).
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def open_backend(name: str, first: Child, *, verbose: bool = False, **options: Any) -> Any:
    """Start a backend on its first child (one engine serves every later child too).

    `verbose` lets vLLM log at INFO; a variable the user set already is left as it is.
    """
    if name == "vllm":
        for key, value in vllm_environment(verbose).items():
            if verbose and key == "VLLM_LOGGING_LEVEL":
                os.environ[key] = value  # --verbose is asked for on this very command line
            else:
                os.environ.setdefault(key, value)
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise DependencyError(f"--backend vllm needs vLLM, which is not installed: {install_hint()}") from None
        from darwin_stream.score.vllm_backend import VllmBackend

        # the per-shard "Loading safetensors checkpoint shards" bars, at start and on every swap
        options["engine_args"] = {"use_tqdm_on_load": verbose, **(options.get("engine_args") or {})}
        return VllmBackend(first, **options)
    if name == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise DependencyError(f"--backend hf needs transformers: {hint('hf')}") from None
        from darwin_stream.score.hf_backend import HfBackend

        return HfBackend(first, **options)
    raise ScoreError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
