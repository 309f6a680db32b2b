"""Candidates scored per minute: three ways of getting a child into a vLLM engine.

    .venv/bin/python tools/bench_score.py --model tiny --candidates 8
    .venv/bin/python tools/bench_score.py --model qwen3-0.6b --candidates 4 --fresh 1

- inplace: one engine; each child is planned in this process and bred inside the worker
  (`collective_rpc("darwin_breed", plan_json)`), nothing written to disk;
- reload: one engine; each child is merged to disk (`darwin_stream.merge`) and swapped in with
  `collective_rpc("reload_weights", weights_path=...)`;
- fresh: each child merged to disk, then a new engine started on it (what restarting costs).

Every candidate is a different slerp t, scored on the same small tasks (a choice task and a
perplexity task). Prints one JSON object with per-candidate medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MANIFEST = """\
merge_method: slerp
base_model: {father}
models:
  - model: {father}
  - model: {mother}
parameters:
  t: {t}
dtype: bfloat16
"""

QWEN3_06B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0,
    pad_token_id=1,
)


def build_qwen3_06b(out: Path, seed: int) -> Path:
    """Random Qwen3-0.6B-geometry checkpoint (~1.1 GiB bf16), written tensor by tensor (no
    transformers model in memory), with the demo tokenizer (its ids fit the large vocabulary)."""
    from safetensors.torch import save_file

    from darwin_stream.demo import build_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    c = QWEN3_06B
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)

    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(c["vocab_size"], h), "model.norm.weight": norm(h)}
    save_file(shard, str(out / "model-embed.safetensors"), metadata={"format": "pt"})
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shard = {
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "self_attn.q_norm.weight": norm(d), p + "self_attn.k_norm.weight": norm(d),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
        }
        save_file(shard, str(out / f"model-layer{layer:02d}.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2))
    build_tokenizer(out)
    gen = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def many_choices(task, n: int, path: Path):
    """A choice task of n items: the shipped items, each prompt numbered so that no two are alike."""
    from darwin_stream.score.tasks import load_task

    lines = [json.dumps({"task": {"name": f"choice{n}", "kind": "choice", "metric": task.metric}})]
    for i in range(n):
        item = task.items[i % len(task.items)]
        lines.append(json.dumps({**item, "prompt": f"{i}. {item['prompt']}"}))
    path.write_text("\n".join(lines) + "\n")
    return load_task(path)


def parents(kind: str, work: Path) -> tuple[Path, Path]:
    if kind == "tiny":
        from darwin_stream.demo import build_model

        return build_model(work / "father", seed=1), build_model(work / "mother", seed=2)
    return build_qwen3_06b(work / "father", 1), build_qwen3_06b(work / "mother", 2)


def plan_for(father: Path, mother: Path, t: float, work: Path):
    from darwin_stream.api import load_plan

    p = work / f"cand-{t:.4f}.yaml"
    p.write_text(MANIFEST.format(father=father, mother=mother, t=t))
    return load_plan(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "qwen3-0.6b"], default="tiny")
    ap.add_argument("--candidates", type=int, default=8, help="children per mode (inplace, reload)")
    ap.add_argument("--fresh", type=int, default=2, help="children for the new-engine-per-child mode")
    ap.add_argument("--workdir", default=None, help="where parents and disk children go (default: a temp dir)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--choice-items", type=int, default=0,
                    help="score a choice task of this many items (the shipped ones, numbered) instead of the two small tasks")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from darwin_stream.api import merge
    from darwin_stream.score.backend import open_backend
    from darwin_stream.score.run import score_child
    from darwin_stream.score.tasks import load_task

    data = Path(__file__).parents[1] / "darwin_stream" / "score" / "data"
    tasks = [load_task(data / "capitals_choice.jsonl"), load_task(data / "corpus_perplexity.jsonl")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-score-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.choice_items:
        tasks = [many_choices(tasks[0], args.choice_items, work / "choices.jsonl")]
    t0 = time.perf_counter()
    father, mother = parents(args.model, work / args.model)
    print(f"parents ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ts = [(k + 1) / (args.candidates + 1) for k in range(args.candidates)]
    res: dict[str, dict[str, list[float]]] = {m: {} for m in ("inplace", "reload", "fresh")}

    def rec(mode: str, **kv: float) -> None:
        for k, v in kv.items():
            res[mode].setdefault(k, []).append(v)

    t0 = time.perf_counter()
    backend = open_backend("vllm", str(father), max_model_len=args.max_model_len)
    engine_start = time.perf_counter() - t0
    score_child(backend, tasks)  # warm-up, not counted
    for t in ts:
        a = time.perf_counter()
        plan = plan_for(father, mother, t, work)
        b = time.perf_counter()
        backend.load(plan)
        c = time.perf_counter()
        score_child(backend, tasks)
        d = time.perf_counter()
        rec("inplace", plan_s=b - a, breed_s=c - b, score_s=d - c, total_s=d - a)
    child = work / "child"  # loaded right after each merge: written through the page cache
    for t in ts:
        a = time.perf_counter()
        merge(plan_for(father, mother, t, work), child, overwrite=True, direct_io=False)
        b = time.perf_counter()
        backend.load(str(child))
        c = time.perf_counter()
        score_child(backend, tasks)
        d = time.perf_counter()
        rec("reload", merge_s=b - a, reload_s=c - b, score_s=d - c, total_s=d - a)
    backend.close()
    for t in ts[: args.fresh]:
        a = time.perf_counter()
        merge(plan_for(father, mother, t, work), child, overwrite=True, direct_io=False)
        b = time.perf_counter()
        fresh = open_backend("vllm", str(child), max_model_len=args.max_model_len)
        c = time.perf_counter()
        score_child(fresh, tasks)
        d = time.perf_counter()
        fresh.close()
        rec("fresh", merge_s=b - a, start_s=c - b, score_s=d - c, total_s=d - a)

    summary = {
        mode: {k: round(statistics.median(v), 3) for k, v in parts.items()} | {
            "n": len(parts["total_s"]), "per_minute": round(60 / statistics.median(parts["total_s"]), 2)}
        for mode, parts in res.items() if parts
    }
    ip = summary["inplace"]
    out = {
        "model": args.model,
        "parent_bytes": sum(f.stat().st_size for f in father.glob("*.safetensors")),
        "engine_start_s": round(engine_start, 1),
        "dtype": backend.dtype,
        "cores": os.cpu_count(),
        **summary,
        "inplace_vs_reload": round(ip["per_minute"] / summary["reload"]["per_minute"], 1),
        "inplace_vs_fresh": round(ip["per_minute"] / summary["fresh"]["per_minute"], 1) if "fresh" in summary else None,
        "breed_over_score": round((ip["plan_s"] + ip["breed_s"]) / ip["score_s"], 3),
    }
    print(json.dumps(out), flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    # Same reason as the CLI: never let engine teardown at exit turn a finished run into a failure.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # vLLM spawns its engine: the entry point must be guarded
    main()
