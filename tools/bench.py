"""Merge benchmark: darwin-stream against the I/O floor and mergekit, on real Qwen3 geometries.

Why this exists: darwin-stream's claims (issue 3, section 8) are that a merge stays within its memory
budget above the `plan` baseline, runs within 1.2x the physical I/O floor (reading the parents while
writing the child, each by dd with direct I/O; issue 11), and is at least 2x faster than mergekit 0.1.5. Each claim is a ratio measured in
the same run and the same page-cache state, so this script measures every side of every ratio
back to back, repeats, and reports medians.

    .venv/bin/python tools/bench.py run --geometry tiny --reps 1                  # seconds: try the tool
    .venv/bin/python tools/bench.py run --geometry 0.6b --reps 3 --mergekit .bench/mk/bin/mergekit-yaml --contract
    .venv/bin/python tools/bench.py run --geometry 4b --reps 3 --mergekit .bench/mk/bin/mergekit-yaml --mergekit-states warm
    .venv/bin/python tools/bench.py report --write-docs   # splice the section into docs/benchmarks.md

Everything generated (parents, manifests, children, logs, raw JSON, the rendered section) lives under
.bench/, which git ignores: `run` and `report` never touch the tracked docs unless given --write-docs,
and then they replace only the sections of the geometries that have results, keeping the others as
they are. `run` generates the parents it needs (`gen` does only that). Children are deleted after
each run; parents are kept, since the 4B pair takes minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
DOCS = ROOT / "docs" / "benchmarks.md"
DARWIN = bc.darwin_cli(ROOT)
SECTION = "## Merge benchmark"
SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
BLOCK_ELEMS = 8 * 2**20  # generation block: 32 MiB of float32 at a time, never a whole tensor
METHODS = ("linear", "slerp")
STATES = ("cold", "warm")
CONTRACT_TOL = 1e-4


# --- geometries and synthetic parents ------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The shapes of a real Qwen3 checkpoint: enough to make merge I/O and arithmetic realistic."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151936
    tied: bool = True

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order a Hugging Face Qwen3 checkpoint lays them out by layer."""
        h, hd = self.hidden, self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (self.heads * hd, h)
            yield p + "self_attn.k_proj.weight", (self.kv_heads * hd, h)
            yield p + "self_attn.v_proj.weight", (self.kv_heads * hd, h)
            yield p + "self_attn.o_proj.weight", (h, self.heads * hd)
            yield p + "self_attn.q_norm.weight", (hd,)
            yield p + "self_attn.k_norm.weight", (hd,)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (self.intermediate, h)
            yield p + "mlp.up_proj.weight", (self.intermediate, h)
            yield p + "mlp.down_proj.weight", (h, self.intermediate)
        yield "model.norm.weight", (h,)
        if not self.tied:
            yield "lm_head.weight", (self.vocab, h)

    def config(self) -> dict:
        """config.json as Qwen publishes it for this size (transformers loads the child with it)."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 40960,
            "max_window_layers": self.layers,
            "model_type": "qwen3",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab,
        }

    def nbytes(self) -> int:
        return sum(2 * int(np.prod(s)) for _, s in self.tensors())


GEOMETRIES = {
    "0.6b": Geometry("qwen3-0.6b", hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8),
    "4b": Geometry("qwen3-4b", hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8),
    # Not a real checkpoint: 10 MiB per parent, to try the benchmark tools in seconds (not for the docs).
    "tiny": Geometry("tiny-qwen3", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=64,
                     vocab=4096),
}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, rounded to nearest even (as torch's .to(bfloat16) does)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length and JSON header of a bf16 shard, padded to 8 bytes like safetensors does."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = 2 * int(np.prod(shape))
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def shard_plan(geom: Geometry) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most 5 GB, in order, as save_pretrained would."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in geom.tensors():
        n = 2 * int(np.prod(shape))
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def generate_parent(geom: Geometry, out: Path, seed: int) -> None:
    """Write a random bf16 parent, block by block: never more than one block lives in memory.

    Weights are N(0, 0.02) like an initialised transformer; norm weights are 1 + N(0, 0.02) so the
    two parents differ everywhere (identical tensors would let slerp skip its real path).
    """
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = shard_plan(geom)
    weight_map: dict[str, str] = {}
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            f.write(safetensors_header(entries))
            for name, shape in entries:
                weight_map[name] = fname
                left = int(np.prod(shape))
                shift = 1.0 if name.endswith("norm.weight") else 0.0
                while left:
                    n = min(left, BLOCK_ELEMS)
                    x = rng.standard_normal(n, dtype=np.float32)
                    x *= 0.02
                    x += shift
                    f.write(to_bf16_bits(x).tobytes())
                    left -= n
            f.flush()
            os.fsync(f.fileno())
    index = {"metadata": {"total_size": geom.nbytes()}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(geom.config(), indent=2) + "\n")
    gen_cfg = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True,
               "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def parents_of(geom: Geometry) -> list[Path]:
    return [BENCH / "parents" / geom.name / p for p in ("a", "b")]


def ensure_parents(geom: Geometry, force: bool = False) -> list[Path]:
    """Generate the two parents once; a marker holding the geometry proves a finished generation."""
    paths = parents_of(geom)
    for seed, path in enumerate(paths, start=1):
        marker = path.with_name(path.name + ".done")
        want = json.dumps({"geometry": geom.__dict__, "seed": seed}, sort_keys=True)
        if not force and path.is_dir() and marker.exists() and marker.read_text() == want:
            continue
        marker.unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"[gen] {geom.name} parent {path.name}: {geom.nbytes() / bc.GiB:.2f} GiB", flush=True)
        generate_parent(geom, path, seed)
        marker.write_text(want)
        print(f"[gen] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# --- manifests -----------------------------------------------------------------------------------


def manifest_text(method: str, parents: list[Path]) -> str:
    """The mergekit YAML that both tools run unchanged."""
    a, b = (str(p) for p in parents)
    if method == "linear":
        return (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: 0.6\n"
                f"  - model: {b}\n    parameters:\n      weight: 0.4\ndtype: bfloat16\n")
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
                "dtype: bfloat16\n")
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def write_manifests(geom: Geometry, parents: list[Path]) -> dict[str, Path]:
    out = {}
    (BENCH / "manifests").mkdir(parents=True, exist_ok=True)
    for m in METHODS:
        p = BENCH / "manifests" / f"{geom.name}-{m}.yml"
        p.write_text(manifest_text(m, parents))
        out[m] = p
    return out


# --- running the tools ---------------------------------------------------------------------------


def tool_env() -> dict:
    """Offline, and no tokenizer download attempts: the benchmark must not touch the network."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def parse_size(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    s = text.strip().lower()
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


def clean_children() -> None:
    """Children and any temporary siblings a tool left: nothing but parents survives a run."""
    d = BENCH / "children"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def prepare(state: str, parents: list[Path]) -> float:
    """No children left, parents in `state`; returns their resident fraction after."""
    clean_children()
    return bc.cache_state(state, parents)


def finish_run(rec: dict) -> dict:
    """Time the write-back the tool left behind (mergekit does not fsync), then drop the child."""
    t0 = time.perf_counter()
    os.sync()
    rec["sync_after_s"] = round(time.perf_counter() - t0, 3)
    clean_children()
    return rec


def run_darwin(manifest: Path, budget: str, tag: str) -> dict:
    out = BENCH / "children" / f"ds-{tag}"
    m = bc.measure([str(DARWIN), "merge", str(manifest), str(out), "--memory-budget", budget,
                    "--json", "--quiet", "--overwrite"], env=tool_env(), log=BENCH / "logs" / f"ds-{tag}")
    rec = {"tool": "darwin-stream", "budget": budget, **m.summary()}
    if m.rc == 0:
        try:
            rec["report"] = json.loads(m.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            rec["report"] = None
        rec["child_bytes"] = child_bytes(out)
    return rec


def run_mergekit(mergekit: str, manifest: Path, tag: str) -> dict:
    """mergekit-yaml with the options a typical CPU user leaves at their defaults."""
    out = BENCH / "children" / f"mk-{tag}"
    m = bc.measure([mergekit, str(manifest), str(out)], env=tool_env(), log=BENCH / "logs" / f"mk-{tag}")
    rec = {"tool": "mergekit", "budget": None, **m.summary()}
    if m.rc == 0:
        rec["child_bytes"] = child_bytes(out)
    return rec


def run_plan(manifest: Path, budget: str, tag: str) -> dict:
    m = bc.measure([str(DARWIN), "plan", str(manifest), "--memory-budget", budget], env=tool_env(),
                   log=BENCH / "logs" / f"plan-{tag}")
    return {"tool": "plan", "budget": budget, **m.summary()}


def child_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in bc.files_under([path]) if f.suffix == ".safetensors")


# --- reading safetensors without torch (for the numerical contract) ------------------------------


def read_index(path: Path) -> dict[str, tuple[Path, dict, int]]:
    """name -> (shard, header entry, data start) for every tensor of a safetensors checkpoint."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            out[name] = (shard, entry, 8 + n)
    return out


def tensor_bits(entry: tuple[Path, dict, int]) -> np.ndarray:
    shard, meta, start = entry
    if meta["dtype"] != "BF16":
        raise ValueError(f"{shard}: expected BF16 tensors, got {meta['dtype']}")
    a, b = meta["data_offsets"]
    return np.memmap(shard, dtype=np.uint16, mode="r", offset=start + a, shape=((b - a) // 2,))


def compare_children(ours: Path, theirs: Path) -> dict:
    """Per tensor, the fraction of elements more than 1 bf16 ulp apart (contract: <= 1e-4)."""
    a, b = read_index(ours), read_index(theirs)
    rows = []
    for name in sorted(set(a) & set(b)):
        if a[name][1]["shape"] != b[name][1]["shape"]:
            rows.append({"tensor": name, "fraction": 1.0, "note": "shape differs"})
            continue
        x, y = tensor_bits(a[name]), tensor_bits(b[name])
        bad = max_ulp = 0
        for s in range(0, x.size, 16 * 2**20):
            ox = bc.bf16_ordinal(np.asarray(x[s:s + 16 * 2**20]))
            oy = bc.bf16_ordinal(np.asarray(y[s:s + 16 * 2**20]))
            d = np.abs(ox - oy)
            bad += int(np.count_nonzero(d > 1))
            max_ulp = max(max_ulp, int(d.max()) if d.size else 0)
        rows.append({"tensor": name, "fraction": bad / max(x.size, 1), "max_ulp": max_ulp})
    worst = sorted(rows, key=lambda r: -r["fraction"])[:5]
    return {
        "tensors_compared": len(rows),
        "only_darwin": sorted(set(a) - set(b)),
        "only_mergekit": sorted(set(b) - set(a)),
        "max_fraction": max((r["fraction"] for r in rows), default=None),
        "tensors_over_tol": sum(r["fraction"] > CONTRACT_TOL for r in rows),
        "max_ulp": max((r.get("max_ulp", 0) for r in rows), default=None),
        "worst": worst,
    }


def run_contract(geom: Geometry, manifests: dict[str, Path], mergekit: str) -> list[dict]:
    """Merge each manifest with both tools and compare the children tensor by tensor."""
    out = []
    for method, manifest in manifests.items():
        clean_children()
        ds = run_darwin(manifest, "1GiB", f"contract-{method}")
        mk = run_mergekit(mergekit, manifest, f"contract-{method}")
        rec: dict = {"geometry": geom.name, "method": method, "darwin_rc": ds["rc"], "mergekit_rc": mk["rc"]}
        if ds["rc"] == 0 and mk["rc"] == 0:
            rec.update(compare_children(BENCH / "children" / f"ds-contract-{method}",
                                        BENCH / "children" / f"mk-contract-{method}"))
        else:
            rec["error"] = (ds["stderr_tail"] if ds["rc"] else mk["stderr_tail"])[-800:]
        print(f"[contract] {geom.name} {method}: {json.dumps({k: v for k, v in rec.items() if k != 'worst'})}",
              flush=True)
        out.append(rec)
        clean_children()
    return out


# --- the benchmark loop --------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on: they mean nothing without it."""
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cores": os.cpu_count(),
            "ram_gib": round(int(mem) / 2**20, 1), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "git": rev,
            "load_avg_at_start": os.getloadavg()}


def versions(mergekit: str | None) -> dict:
    v = {}
    py = DARWIN.parent / "python"  # the interpreter of the darwin-stream being measured
    v["darwin-stream torch"] = subprocess.run([str(py), "-c", "import torch;print(torch.__version__)"],
                                              capture_output=True, text=True).stdout.strip()
    if mergekit:
        mkpy = Path(mergekit).parent / "python"
        v["mergekit"] = subprocess.run(
            [str(mkpy), "-c", "import importlib.metadata as m;print(m.version('mergekit'), m.version('torch'))"],
            capture_output=True, text=True).stdout.strip()
    return v


def cmd_run(args: argparse.Namespace) -> int:
    """Per geometry, per cache state, per repetition, per method: floor, darwin-stream, mergekit."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = BENCH / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    raw_path = results_dir / f"run-{stamp}.json"
    budgets = args.budgets.split(",")
    methods = args.methods.split(",")
    states = args.states.split(",")
    doc = {"machine": machine(), "versions": versions(args.mergekit), "argv": sys.argv,
           "geometries": args.geometry.split(","), "reps": args.reps, "runs": [], "plans": [], "contract": []}
    for gname in args.geometry.split(","):
        geom = GEOMETRIES[gname]
        parents = ensure_parents(geom)
        manifests = write_manifests(geom, parents)
        nbytes = geom.nbytes()
        if not args.skip_darwin:
            for method in methods:
                for budget in budgets:
                    for rep in range(args.reps):
                        rec = run_plan(manifests[method], budget, f"{geom.name}-{method}")
                        doc["plans"].append({"geometry": geom.name, "method": method, "rep": rep, **rec})
                        print(f"[plan] {geom.name} {method} {budget}: rc={rec['rc']} "
                              f"anon={rec['peak_anon'] / bc.MiB:.0f} MiB", flush=True)
                        if rec["rc"]:
                            print(rec["stderr_tail"][-1500:], flush=True)
            bc.dump(raw_path, doc)
        for state in states:
            for rep in range(args.reps):
                for method in methods:
                    base = {"geometry": geom.name, "method": method, "state": state, "rep": rep}
                    resident = prepare(state, parents)
                    load = round(os.getloadavg()[0], 2)
                    floor = {**bc.physical_floor(parents, nbytes, BENCH / "children", state), "load_before": load}
                    recs = [finish_run({**base, "tool": "floor", "resident_before": resident, **floor})]
                    if not args.skip_darwin:
                        for budget in budgets:
                            resident = prepare(state, parents)
                            rec = run_darwin(manifests[method], budget, f"{geom.name}-{method}")
                            recs.append(finish_run({**base, "resident_before": resident, **rec}))
                    if args.mergekit and state in args.mergekit_states.split(","):
                        resident = prepare(state, parents)
                        rec = run_mergekit(args.mergekit, manifests[method], f"{geom.name}-{method}")
                        recs.append(finish_run({**base, "resident_before": resident, **rec}))
                    for r in recs:
                        print(f"[run] {geom.name} {method} {state} rep{rep} {r['tool']} {r.get('budget') or ''}: "
                              f"rc={r.get('rc', 0)} wall={r['wall_s']:.2f}s "
                              f"anon={r.get('peak_anon', 0) / bc.MiB:.0f}MiB rss={r.get('peak_rss', 0) / bc.MiB:.0f}MiB "
                              f"res={r['resident_before']} sync_after={r['sync_after_s']}", flush=True)
                        if r.get("rc"):
                            print(r["stderr_tail"][-1500:], flush=True)
                    doc["runs"] += recs
                    bc.dump(raw_path, doc)
        if args.contract and args.mergekit and not args.skip_darwin:
            doc["contract"] += run_contract(geom, manifests, args.mergekit)
            bc.dump(raw_path, doc)
    clean_children()
    print(f"[done] raw results: {raw_path}", flush=True)
    render_docs(write=args.write_docs)
    return 0


# --- the report ----------------------------------------------------------------------------------


def latest_results() -> dict[str, dict]:
    """The newest run file for each geometry: a 4B run does not erase the 0.6B numbers."""
    chosen: dict[str, dict] = {}
    for f in sorted((BENCH / "results").glob("run-*.json")):
        doc = json.loads(f.read_text())
        doc["file"] = str(f.relative_to(ROOT))
        if not any(r["tool"] != "floor" for r in doc["runs"]):
            continue
        for g in doc["geometries"]:
            if g in GEOMETRIES and any(r["geometry"] == GEOMETRIES[g].name for r in doc["runs"]):
                chosen[g] = doc
    return {g: chosen[g] for g in GEOMETRIES if g in chosen}


def kept_from_docs(section: str, ran: set[str]) -> dict[str, dict[str, list[str]]]:
    """What the current docs say about each geometry without results here, to be kept as it is.

    A fresh clone has no .bench/results, so re-rendering from what it has would drop the sections
    measured elsewhere (the 4B one was lost that way). Per geometry name: its `### name (...)`
    subsection, its rows in the contract and targets tables, and the machine line of its raw file.
    """
    kept: dict[str, dict[str, list[str]]] = {}
    lines = section.splitlines()
    for geom in GEOMETRIES.values():
        if geom.name in ran:
            continue
        start = next((i for i, ln in enumerate(lines) if ln.startswith(f"### {geom.name} (")), None)
        if start is None:
            continue
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("### ")), len(lines))
        body = lines[start:end]
        raw = body[0].split("raw: `", 1)[-1].split("`", 1)[0] if "raw: `" in body[0] else None
        rows = [ln for ln in lines if ln.startswith(f"| {geom.name} ")]
        kept[geom.name] = {
            "section": [*body] if body[-1] == "" else [*body, ""],
            "contract": [ln for ln in rows if "numerical contract" not in ln and ln.count("|") == 8],
            "targets": [ln for ln in rows if ln.count("|") == 4],
            "machine": [ln for ln in lines if raw and ln.startswith(f"- `{raw}`")],
        }
    return kept


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def gib(x: float | None) -> str:
    return "—" if x is None else f"{x / bc.GiB:.2f}"


def geometry_tables(doc: dict, gname: str, targets: list[tuple[str, bool | None, str]]) -> list[str]:
    """Tables of medians and same-run ratios for one geometry, and the target checks they feed."""
    geom = GEOMETRIES[gname].name
    runs = [r for r in doc["runs"] if r["geometry"] == geom]
    plans = [p for p in doc["plans"] if p["geometry"] == geom and p["rc"] == 0]
    budgets = sorted({r["budget"] for r in runs if r["tool"] == "darwin-stream"}, key=parse_size, reverse=True)
    default = "1GiB" if "1GiB" in budgets else (budgets[0] if budgets else None)
    has_mk = any(r["tool"] == "mergekit" for r in runs)
    reps = doc["reps"]
    out = [f"### {geom} ({GEOMETRIES[gname].nbytes() / bc.GiB:.2f} GiB per parent, bf16; "
           f"median of {reps} run{'s' if reps > 1 else ''}; raw: `{doc['file']}`)", ""]

    def pick(method: str, state: str, tool: str, budget: str | None, rep: int) -> dict | None:
        for r in runs:
            if (r["method"], r["state"], r["tool"], r["rep"]) == (method, state, tool, rep) and \
                    (tool != "darwin-stream" or r["budget"] == budget) and r.get("rc", 0) == 0:
                return r
        return None

    def reps_of(method: str, state: str) -> list[int]:
        return sorted({r["rep"] for r in runs if (r["method"], r["state"]) == (method, state)})

    def median_ratio(method: str, state: str, top: tuple[str, str | None], bottom: tuple[str, str | None],
                     top_s=lambda r: r["wall_s"]) -> float | None:
        """Median over repetitions of top's seconds / bottom's wall, each pair from the same repetition."""
        ratios = []
        for i in reps_of(method, state):
            a, b = pick(method, state, *top, i), pick(method, state, *bottom, i)
            if a and b and top_s(a) is not None:
                ratios.append(top_s(a) / b["wall_s"])
        return bc.median(ratios)

    head = ["method", "cache", "I/O floor s (read ‖ write)"]
    head += [f"darwin-stream {b} s" for b in budgets]
    head += ["mergekit s"] if has_mk else []
    head += [f"ds {b} / floor" for b in budgets]
    head += [f"mergekit / ds {default}"] if has_mk and default else []
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    states = [s for s in STATES if any(r["state"] == s for r in runs)]
    for method in methods:
        for state in states:
            reps_ = reps_of(method, state)
            fl = [pick(method, state, "floor", None, i) for i in reps_]
            row = [method, state, f"{fmt(bc.median(f['wall_s'] for f in fl if f))} "
                   f"({fmt(bc.median(f['read_s'] for f in fl if f))} ‖ {fmt(bc.median(f['write_s'] for f in fl if f))})"]
            for b in budgets:
                row.append(fmt(bc.median(r["wall_s"] for i in reps_ if (r := pick(method, state, "darwin-stream", b, i)))))
            if has_mk:
                row.append(fmt(bc.median(r["wall_s"] for i in reps_ if (r := pick(method, state, "mergekit", None, i)))))
            for b in budgets:
                med = median_ratio(method, state, ("darwin-stream", b), ("floor", None))
                row.append(fmt(med, ".2f", "×"))
                if b == default:
                    targets.append((f"{geom} {method} {state}: darwin-stream wall ≤ 1.2× I/O floor",
                                    None if med is None else med <= 1.2, f"{fmt(med, '.2f', '×')}"))
            if has_mk and default:
                med = median_ratio(method, state, ("mergekit", None), ("darwin-stream", default))
                row.append(fmt(med, ".2f", "×"))
                if state == "warm":
                    targets.append((f"{geom} {method} warm: ≥ 2× faster than mergekit",
                                    None if med is None else med >= 2.0, f"{fmt(med, '.2f', '×')}"))
            out.append("| " + " | ".join(row) + " |")
    if default:
        out += ["", f"Where darwin-stream {default}'s wall time goes: the `merge()` call itself (the `wall_s` of its "
                "`--json` report, what a library caller in a running process pays) and the rest of the "
                "process (interpreter start, importing torch, dask and zarr, exit):", "",
                "| method | cache | process wall s | of which merge() s | start-up and exit s | merge() / floor |",
                "|---|---|---|---|---|---|"]
        for method in methods:
            for state in states:
                ds = [d for i in reps_of(method, state)
                      if (d := pick(method, state, "darwin-stream", default, i)) and d.get("report")]
                walls = [d["wall_s"] for d in ds]
                calls = [d["report"]["wall_s"] for d in ds]
                ratio = median_ratio(method, state, ("darwin-stream", default), ("floor", None),
                                      top_s=lambda r: r["report"]["wall_s"] if r.get("report") else None)
                if calls:
                    out.append(f"| {method} | {state} | {fmt(bc.median(walls))} | {fmt(bc.median(calls))} | "
                               f"{fmt(bc.median(w - c for w, c in zip(walls, calls, strict=True)))} | "
                               f"{fmt(ratio, '.2f', '×')} |")
    out += ["", "CPU time (user + system over the process tree, s; median over runs and cache states). "
            "Unlike wall time it barely depends on how busy the shared cores were:", ""]
    head = ["method", *[f"darwin-stream {b}" for b in budgets], *(["mergekit", f"mergekit / ds {default}"]
                                                                     if has_mk else [])]
    has_flt = any("minflt" in r for r in runs)
    if has_flt:
        head += [f"ds {default} system s", f"ds {default} minor faults (× 4 KiB)"]
    if has_flt and has_mk:
        head += ["mergekit system s", "mergekit minor faults (× 4 KiB)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        ok = [r for r in runs if r["method"] == method and r.get("rc", 0) == 0 and "cpu_s" in r]
        ds = {b: bc.median(r["cpu_s"] for r in ok if r["tool"] == "darwin-stream" and r["budget"] == b)
              for b in budgets}
        row = [method, *[fmt(ds[b]) for b in budgets]]
        if has_mk:
            mk = bc.median(r["cpu_s"] for r in ok if r["tool"] == "mergekit")
            row += [fmt(mk), fmt(mk / ds[default], ".2f", "×") if mk and ds.get(default) else "—"]
        for tool, b in (("darwin-stream", default), *((("mergekit", None),) if has_mk else ())) if has_flt else ():
            rs = [r for r in ok if r["tool"] == tool and r["budget"] == b and "minflt" in r]
            flt = bc.median(r["minflt"] for r in rs)
            row += [fmt(bc.median(r["sys_s"] for r in rs)),
                    "—" if flt is None else f"{flt / 1e6:.2f} M ({flt * 4096 / bc.GiB:.1f} GiB)"]
        out.append("| " + " | ".join(row) + " |")
    cores = doc["machine"]["cores"] or 1
    bound = []
    for method in methods:
        cpu = bc.median(r["cpu_s"] for r in runs if r["method"] == method and r["tool"] == "darwin-stream"
                        and r["budget"] == default and r.get("rc", 0) == 0 and "cpu_s" in r)
        flo = bc.median(r["wall_s"] for r in runs if r["method"] == method and r["tool"] == "floor")
        if cpu is not None and flo:
            bound.append(f"{method} {cpu / cores:.1f} s vs I/O floor {flo:.1f} s ({cpu / cores / flo:.1f}×)")
    if bound:
        out += ["", f"darwin-stream {default} CPU time ÷ {cores} cores, the wall time it could reach with "
                "perfect parallelism and no I/O wait, against the median I/O floor: " + "; ".join(bound) + ".", ""]
    loads = [r["load_before"] for r in runs if "load_before" in r]
    out += ["", f"1-minute load average at the start of the runs: median {fmt(bc.median(loads), '.1f')}, "
            f"max {fmt(max(loads, default=None), '.1f')} (on {doc['machine']['cores']} cores).", ""]
    out += ["", "Memory (GiB; peak over the process tree, median over runs and cache states; "
            "“over baseline” is the worst run):", ""]
    head = ["method", "tool", "budget", "plan baseline anon", "peak anon", "over baseline (worst)",
            "within budget", "peak RSS"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        for b in budgets:
            base = bc.median(p["peak_anon"] for p in plans if p["method"] == method and p["budget"] == b)
            rs = [r for r in runs if r["method"] == method and r["tool"] == "darwin-stream"
                  and r["budget"] == b and r["rc"] == 0]
            if not rs:
                continue
            worst = max(r["peak_anon"] for r in rs) - base if base is not None else None
            ok = None if worst is None else worst <= parse_size(b)
            targets.append((f"{geom} {method} {b}: peak private − plan baseline ≤ budget", ok,
                            f"{gib(worst)} GiB over {gib(base)} GiB baseline"))
            out.append("| " + " | ".join([method, "darwin-stream", b, gib(base),
                                          gib(bc.median(r["peak_anon"] for r in rs)), gib(worst),
                                          {True: "yes", False: "**no**", None: "—"}[ok],
                                          gib(bc.median(r["peak_rss"] for r in rs))]) + " |")
        mk = [r for r in runs if r["method"] == method and r["tool"] == "mergekit" and r["rc"] == 0]
        if mk:
            out.append("| " + " | ".join([method, "mergekit 0.1.5", "—", "—",
                                          gib(bc.median(r["peak_anon"] for r in mk)), "—", "—",
                                          gib(bc.median(r["peak_rss"] for r in mk))]) + " |")
    res = [r["resident_before"] for r in runs if r["state"] == "warm"]
    cold = [r["resident_before"] for r in runs if r["state"] == "cold"]
    syncs = {t: bc.median(r["sync_after_s"] for r in runs if r["tool"] == t) for t in ("darwin-stream", "mergekit")}
    out += ["", f"Parents' bytes in page cache at the start of a run: warm runs min {fmt(min(res, default=None), '.2f')}, "
            f"cold runs max {fmt(max(cold, default=None), '.3f')}. Median `sync` time after a run "
            f"(write-back the tool left behind, not in its wall time): darwin-stream "
            f"{fmt(syncs['darwin-stream'], '.2f')} s, mergekit {fmt(syncs['mergekit'], '.2f')} s.", ""]
    failed = [r for r in runs if r.get("rc")]
    if failed:
        out += [f"Failed runs ({len(failed)}), not in the medians: "
                + "; ".join(f"{r['tool']} {r['method']} {r['state']} {r.get('budget') or ''} rc={r['rc']}"
                            for r in failed[:6]), ""]
    return out


def render_section(kept: dict[str, dict[str, list[str]]] | None = None) -> str:
    """The "## Merge benchmark" section: tables from .bench/results, and `kept` text (from the
    current docs) for geometries without results here."""
    results = latest_results()
    kept = kept or {}
    docs = list({id(d): d for d in results.values()}.values())
    lines = [SECTION, "",
             "Generated by `tools/bench.py` (do not edit by hand; rerun it). Synthetic parents with the real "
             "Qwen3 tensor names and shapes (random N(0, 0.02) bf16, 5 GB shards with an index, tied "
             "embeddings), merged with the same mergekit YAML by darwin-stream and by mergekit 0.1.5. "
             "Wall time and peak memory are sampled every 20 ms over the whole process tree "
             "(RssAnon = private memory, what a RAM limit bites on; RSS also counts mapped file pages). "
             "The I/O floor is the physical one, measured in the same run and page-cache state: `dd` reads "
             "both parents while another `dd` writes the child's size with `oflag=direct conv=fsync`, at "
             "the same time; the floor is the later of the two to finish (read ‖ write). Cold, the read "
             "is `iflag=direct`; warm, it is dd's plain read of the cached pages a merge reads "
             "(`bench_common.physical_floor`). The floor before issue 11 added a buffered read to a "
             "buffered write, which a merge that overlaps the two and writes with O_DIRECT beat. "
             "Cold = parents evicted with `posix_fadvise(DONTNEED)` after `sync`; warm = parents "
             "read once beforehand. Ratios are computed per repetition, then the median is taken.", ""]
    old = [g for g, k in kept.items() if any("I/O floor s (read + write)" in ln for ln in k["section"])]
    if old:  # kept tables from before the physical floor: say which, so no ratio is read against the wrong one
        lines[-2] += (f" The tables of {', '.join(old)} were measured against that older floor (their heads say "
                      "\"read + write\", and their ratios and targets use it, with 1.3× as the target); rerun "
                      "`tools/bench.py run` for the physical one.")
    if not docs and not kept:
        return "\n".join([*lines, "No results yet.", ""])
    targets: list[tuple[str, bool | None, str]] = []
    for g, geom in GEOMETRIES.items():
        if g in results:
            lines += geometry_tables(results[g], g, targets)
        elif geom.name in kept:
            lines += kept[geom.name]["section"]
    contract = [c for g, d in results.items() for c in d.get("contract", []) if c["geometry"] == GEOMETRIES[g].name]
    kept_contract = [row for k in kept.values() for row in k["contract"]]
    if contract or kept_contract:
        lines += ["### Numerical contract against mergekit", "",
                  "Same YAML, both children compared tensor by tensor: fraction of elements more than 1 bf16 "
                  f"ulp apart (contract: ≤ {CONTRACT_TOL:g} per tensor).", "",
                  "| geometry | method | tensors compared | max fraction > 1 ulp | tensors over 1e-4 | max ulp | "
                  "names only in one child |", "|---|---|---|---|---|---|---|"]
        for c in contract:
            if "error" in c:
                lines.append(f"| {c['geometry']} | {c['method']} | failed | — | — | — | "
                             f"{c['error'].strip().splitlines()[-1][:120] if c['error'].strip() else ''} |")
                targets.append((f"{c['geometry']} {c['method']}: numerical contract vs mergekit", None, "merge failed"))
                continue
            only = len(c["only_darwin"]) + len(c["only_mergekit"])
            lines.append(f"| {c['geometry']} | {c['method']} | {c['tensors_compared']} | {c['max_fraction']:.2e} | "
                         f"{c['tensors_over_tol']} | {c['max_ulp']} | {only} |")
            targets.append((f"{c['geometry']} {c['method']}: numerical contract vs mergekit",
                            c["tensors_over_tol"] == 0 and only == 0, f"max fraction {c['max_fraction']:.2e}"))
        lines += [*kept_contract, ""]
    lines += ["### Targets", "", "| target | met | measured |", "|---|---|---|"]
    rows = [f"| {name} | {({True: 'met', False: '**not met**', None: 'not measured'})[ok]} | {val} |"
            for name, ok, val in targets]
    for geom in GEOMETRIES.values():  # one geometry's rows together, in the geometries' order
        lines += [r for r in rows if r.startswith(f"| {geom.name} ")] + kept.get(geom.name, {}).get("targets", [])
    lines += ["", "### Machine and commands", ""]
    for doc in docs:
        m = doc["machine"]
        lines.append(f"- `{doc['file']}`: {m['date']}, {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, "
                     f"kernel {m['kernel']}, Python {m['python']}, git {m['git'] or '(uncommitted)'}, "
                     f"load average at start {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}; "
                     f"versions {json.dumps(doc['versions'])}; argv `{' '.join(doc['argv'][1:])}`")
    lines += [row for k in kept.values() for row in k["machine"]]
    lines += ["- The machine is shared with other engineers' test runs; the load average above says how "
              "busy it was.", "", "From a fresh clone, in this order (`tools/bench.py run` generates the parents "
              "it needs under .bench/; the 0.6B pair takes about a minute, the 4B pair several):", "", "```sh",
              "bash tools/setup.sh demo",
              "python3 -m venv .bench/mk && .bench/mk/bin/pip install torch==2.13.0 && "
              ".bench/mk/bin/pip install mergekit==0.1.5   # CPU machine without a local torch wheel: "
              "add --index-url https://download.pytorch.org/whl/cpu to the torch install",
              ".venv/bin/python tools/bench.py run --geometry 0.6b --reps 3 "
              "--mergekit .bench/mk/bin/mergekit-yaml --contract",
              ".venv/bin/python tools/bench.py run --geometry 4b --reps 3 --mergekit .bench/mk/bin/mergekit-yaml --mergekit-states warm",
              ".venv/bin/python tools/bench.py report --write-docs   # splice this section into docs/benchmarks.md",
              "```", ""]
    return "\n".join(lines)


def render_docs(write: bool = False) -> Path:
    """Render the "## Merge benchmark" section into .bench/, and into docs/benchmarks.md if `write`.

    Only that section of the docs is replaced (the others belong to other benchmarks), and within
    it the geometries without results here keep their current text.
    """
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    end = None if start is None else next(
        (j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    current = "" if start is None else "".join(lines[start:end])
    ran = {GEOMETRIES[g].name for g in latest_results()}
    section = render_section(kept_from_docs(current, ran))
    out = BENCH / "results" / "merge-benchmark.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(section.rstrip("\n") + "\n")
    print(f"[docs] rendered {SECTION!r} into {out.relative_to(ROOT)}"
          + ("" if write else "; --write-docs splices it into docs/benchmarks.md"), flush=True)
    if not write:
        return out
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "".join(lines[:start]) + section.rstrip("\n") + "\n\n" + "".join(lines[end:])
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")
    print(f"[docs] wrote {SECTION!r} in {DOCS.relative_to(ROOT)}", flush=True)
    return DOCS


# --- command line --------------------------------------------------------------------------------


def cmd_gen(args: argparse.Namespace) -> int:
    for g in args.geometry.split(","):
        geom = GEOMETRIES[g]
        write_manifests(geom, ensure_parents(geom, force=args.force))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    render_docs(write=args.write_docs)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen", help="generate the synthetic parents and manifests")
    g.add_argument("--geometry", default="0.6b", help="comma-separated: 0.6b,4b,tiny")
    g.add_argument("--force", action="store_true", help="regenerate even if present")
    g.set_defaults(func=cmd_gen)
    r = sub.add_parser("run", help="generate what is missing, measure, render the section into .bench/")
    r.add_argument("--geometry", default="0.6b", help="comma-separated: 0.6b,4b,tiny")
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--budgets", default="1GiB,256MiB")
    r.add_argument("--states", default=",".join(STATES))
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--mergekit", help="path to mergekit-yaml in a side environment")
    r.add_argument("--mergekit-states", default=",".join(STATES),
                   help="cache states in which to run mergekit (e.g. warm, to save time on 4B)")
    r.add_argument("--contract", action="store_true", help="also compare children with mergekit's")
    r.add_argument("--skip-darwin", action="store_true", help="only the I/O floor and mergekit")
    r.add_argument("--write-docs", action="store_true",
                   help="also replace this benchmark's section of docs/benchmarks.md (default: .bench/ only)")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="render the section from .bench/results into .bench/")
    rep.add_argument("--write-docs", action="store_true",
                     help="also replace this benchmark's section of docs/benchmarks.md")
    rep.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
