"""Does the evolution demo show hybrid vigor? Build it, evolve a task-arithmetic genome, print the table.

For each seed: `build_demo` (reused when built), then CMA-ES (the `cma` package, ask/tell, bounds
through its own option) over per-layer x role weights of the two parents' task vectors, scored in
process by the fast batched greedy exact match, the winner chosen on fitness. The held-out table
(base, parents, the fixed 50/50 linear merge, the evolved child; per skill and combined) decides:
the child must beat every other row on combined held-out by more than one item per skill.

    PYTHONPATH=. python tools/demo_vigor.py --seeds 0 1 2 --out /tmp/demo-vigor --json results.json

This is plain torch arithmetic, child = base + wA*(A - base) + wB*(B - base) per tensor group, which
is darwin-stream's task_arithmetic with base_model = base; the `evolve` command does the same through
the scorer. One torch thread throughout (17x faster than two on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from darwin_stream.demo_models import DemoBuild, DemoSettings, GreedyEval, Skill, build_demo, one_thread


def groups_of(names: list[str], layers: int, kind: str = "layer_role") -> tuple[list[str], dict[str, int]]:
    """Genome groups: per layer, self_attn and mlp; one more for everything else (embeddings, norms).

    That is what a mergekit-style gradient with `filter: self_attn`, `filter: mlp` and a default
    value gives, so a winner written as a manifest reproduces the child. The ablations: "layer" (one
    group per layer, self_attn and mlp together) and "global" (one group for the whole model).
    """
    if kind == "global":
        return ["all"], dict.fromkeys(names, 0)
    roles = ("self_attn", "mlp") if kind == "layer_role" else ("layer",)
    labels = [f"L{i}.{role}" for i in range(layers) for role in roles] + ["rest"]
    of: dict[str, int] = {}
    for name in names:
        m = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp)\.", name)
        label = None if not m else f"L{m.group(1)}.{m.group(2) if kind == 'layer_role' else 'layer'}"
        of[name] = labels.index(label) if label else len(labels) - 1
    return labels, of


class Arithmetic:
    """A live child model whose parameters are set from a genome in place (about 1 ms)."""

    def __init__(self, build: DemoBuild, groups: str = "layer_role"):
        from transformers import Qwen3ForCausalLM

        load = lambda p: Qwen3ForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
        self.model = load(build.base)
        base = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.base = base
        self.delta = {}
        for key, path in build.parents.items():
            sd = dict(load(path).named_parameters())
            self.delta[key] = {n: sd[n].detach() - base[n] for n in base}
        self.labels, self.group = groups_of(list(base), self.model.config.num_hidden_layers, groups)

    @property
    def n_genes(self) -> int:
        return 2 * len(self.labels)

    @torch.no_grad()
    def apply(self, genome: list[float]) -> Any:
        """genome = [wA(group 0), wB(group 0), wA(group 1), ...]."""
        for name, p in self.model.named_parameters():
            g = self.group[name]
            p.copy_(self.base[name] + genome[2 * g] * self.delta["A"][name] + genome[2 * g + 1] * self.delta["B"][name])
        return self.model


def combined(scores: dict[str, float], split: str) -> float:
    vals = [v for k, v in scores.items() if k.startswith(split + "/")]
    return sum(vals) / len(vals)


def evolve(arith: Arithmetic, evaluate: GreedyEval, *, seed: int, popsize: int, generations: int,
           sigma0: float, x0: float, bounds: tuple[float, float]) -> dict[str, Any]:
    """CMA-ES ask/tell, maximising mean fitness exact match; the loop enforces the evaluation cap."""
    import cma

    opts = {"bounds": [bounds[0], bounds[1]], "popsize": popsize, "seed": seed + 1, "verbose": -9,
            "tolflatfitness": 10**6, "tolfun": 0, "tolx": 0}  # ties are common on small item sets
    es = cma.CMAEvolutionStrategy([x0] * arith.n_genes, sigma0, opts)
    history: list[dict[str, Any]] = []
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    for gen in range(generations):
        asked = es.ask()
        fits = []
        for x in asked:
            key = tuple(round(float(v), 12) for v in x)
            if key not in cache:
                cache[key] = evaluate(arith.apply(list(key)))
            fits.append(combined(cache[key], "fitness"))
            history.append({"generation": gen, "genome": list(key), "scores": cache[key], "fitness": fits[-1]})
        es.tell(asked, [-f for f in fits])
    best = max(history, key=lambda h: h["fitness"])  # first of the ties: the earliest found
    return {"best": best, "history": history, "evaluations": len(cache)}


def table(rows: dict[str, dict[str, float]], skills: list[str], n: int) -> str:
    head = f"{'model':<16}" + "".join(f"{s:>10}" for s in skills) + f"{'combined':>10}"
    lines = [f"held-out exact match ({n} items per skill)", head]
    for name, sc in rows.items():
        lines.append(f"{name:<16}" + "".join(f"{sc[f'heldout/{s}']:>10.3f}" for s in skills)
                     + f"{combined(sc, 'heldout'):>10.3f}")
    return "\n".join(lines)


def run_seed(seed: int, args: argparse.Namespace, settings: DemoSettings) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    build = build_demo(Path(args.out) / f"seed{seed}", seed=seed, settings=settings, progress=_progress)
    build_s = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    skills = [s.name for s in settings.skills()]
    with one_thread():
        t1, c1 = time.perf_counter(), time.process_time()
        arith = Arithmetic(build, args.groups)
        items, max_tokens = _eval_sets(build)
        evaluate = GreedyEval(items, max_tokens)
        on_fitness = GreedyEval({k: v for k, v in items.items() if k.startswith("fitness/")}, max_tokens)
        run = evolve(arith, on_fitness, seed=seed, popsize=args.popsize, generations=args.generations,
                     sigma0=args.sigma0, x0=args.x0, bounds=(args.lo, args.hi))
        evolve_s = {"wall_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1}
        n = arith.n_genes
        fixed = {"base": [0.0] * n, "parent A": [1.0, 0.0] * (n // 2), "parent B": [0.0, 1.0] * (n // 2),
                 "linear 50/50": [0.5] * n, "TA 1/1": [1.0] * n}
        rows = {k: evaluate(arith.apply(g)) for k, g in fixed.items()}
        rows["evolved"] = evaluate(arith.apply(run["best"]["genome"]))
        if args.check_scorer:
            result_check = _check_with_scorer(arith, run["best"]["genome"], build, Path(args.out) / f"seed{seed}")
            print(f"  scorer (hf backend) on the evolved child: {result_check}")
    child = combined(rows["evolved"], "heldout")
    rivals = {k: combined(v, "heldout") for k, v in rows.items() if k not in ("evolved", "TA 1/1")}
    margin = child - max(rivals.values())
    result = {
        "seed": seed, "rows": rows, "margin": margin, "needed": 1 / settings.n_heldout,
        "vigor": margin > 1 / settings.n_heldout, "best_fitness": run["best"]["fitness"],
        "best_genome": dict(zip([f"{lab}.{p}" for lab in arith.labels for p in "AB"],
                                [round(v, 3) for v in run["best"]["genome"]], strict=True)),
        "evaluations": run["evaluations"], "build": build.stages, "build_s": build_s, "evolve_s": evolve_s,
        "curve": [max(h["fitness"] for h in run["history"] if h["generation"] <= g) for g in range(args.generations)],
    }
    print(table(rows, skills, settings.n_heldout))
    print(f"seed {seed}: margin {margin:+.4f} (needs > {1 / settings.n_heldout:.4f}) -> "
          f"{'VIGOR' if result['vigor'] else 'no vigor'}; best fitness {run['best']['fitness']:.3f}; "
          f"{run['evaluations']} evaluations")
    print(f"  build {build_s['wall_s']:.0f} s wall / {build_s['cpu_s']:.0f} s cpu; "
          f"evolve {evolve_s['wall_s']:.0f} s wall / {evolve_s['cpu_s']:.0f} s cpu")
    print("  genome " + " ".join(f"{k}={v}" for k, v in result["best_genome"].items()), flush=True)
    return result


def _check_with_scorer(arith: Arithmetic, genome: list[float], build: DemoBuild, root: Path) -> dict[str, float]:
    """Save the child and score it with darwin-stream's own scorer (hf backend): the same figures?"""
    from darwin_stream.demo_models import _save_model
    from darwin_stream.score.hf_backend import HfBackend
    from darwin_stream.score.run import score_child
    from darwin_stream.score.tasks import load_task

    _save_model(arith.apply(genome), root / "evolved")
    backend = HfBackend(str(root / "evolved"), dtype="float32", device="cpu")
    report = score_child(backend, [load_task(p) for p in build.heldout])
    return {name: r["score"] for name, r in report["tasks"].items()}


def _eval_sets(build: DemoBuild) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """The built task files, read back (so the search scores exactly what the scorer would)."""
    from darwin_stream.score.tasks import load_task

    items, max_tokens = {}, {}
    for split, paths in (("fitness", build.fitness), ("heldout", build.heldout)):
        for p in paths:
            task = load_task(p)
            items[f"{split}/{task.name}"] = [(it["prompt"], str(it["answer"])) for it in task.items]
            max_tokens[f"{split}/{task.name}"] = task.max_tokens
    return items, max_tokens


def _progress(stage: str, done: int, total: int) -> None:
    if done == total or done % 100 == 0:
        print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)


def _skill(text: str, name: str) -> Skill:
    kind, lo, hi = text.split(":")
    return Skill(name, kind, int(lo), int(hi))


def settings_from(args: argparse.Namespace) -> DemoSettings:
    s = DemoSettings()
    if args.skill_a:
        s = replace(s, skill_a=_skill(args.skill_a, "skill_a"))
    if args.skill_b:
        s = replace(s, skill_b=_skill(args.skill_b, "skill_b"))
    if args.base_steps:
        s = replace(s, base=replace(s.base, steps=args.base_steps))
    if args.base_lr:
        s = replace(s, base=replace(s.base, lr=args.base_lr))
    if args.base_mix is not None:
        s = replace(s, base=replace(s.base, mix=(args.base_mix, 1 - args.base_mix)))
    for key in ("parent_a", "parent_b"):
        stage = getattr(s, key)
        if args.parent_steps:
            stage = replace(stage, steps=args.parent_steps)
        if args.parent_lr:
            stage = replace(stage, lr=args.parent_lr)
        if args.parent_mix is not None:
            own = args.parent_mix
            stage = replace(stage, mix=(own, 1 - own) if key == "parent_a" else (1 - own, own))
        s = replace(s, **{key: stage})
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/demo-vigor")
    ap.add_argument("--json", help="write every seed's result here")
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--sigma0", type=float, default=0.3)
    ap.add_argument("--x0", type=float, default=0.5)
    ap.add_argument("--lo", type=float, default=0.0)
    ap.add_argument("--hi", type=float, default=1.5)
    ap.add_argument("--skill-a", help="kind:lo:hi, e.g. add:1:3")
    ap.add_argument("--skill-b", help="kind:lo:hi, e.g. reverse:5:10")
    ap.add_argument("--base-steps", type=int)
    ap.add_argument("--base-lr", type=float)
    ap.add_argument("--parent-steps", type=int)
    ap.add_argument("--parent-lr", type=float)
    ap.add_argument("--parent-mix", type=float, help="share of the parent's own skill in its fine-tuning")
    ap.add_argument("--base-mix", type=float, help="share of skill A in the base's training")
    ap.add_argument("--groups", choices=("layer_role", "layer", "global"), default="layer_role")
    ap.add_argument("--check-scorer", action="store_true", help="rescore the evolved child with the hf scorer")
    args = ap.parse_args(argv)
    settings = settings_from(args)
    print(f"settings: {settings}", flush=True)
    results = [run_seed(seed, args, settings) for seed in args.seeds]
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": repr(settings), "args": vars(args), "results": results},
                                              indent=2, default=str))
    ok = sum(r["vigor"] for r in results)
    print(f"hybrid vigor on {ok} of {len(results)} seeds")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
