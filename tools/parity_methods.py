"""Parity with mergekit for the methods darwin-stream took from mergekit 0.1.5: the same YAML, the same
tiny parents, both children compared tensor by tensor.

mergekit is not a dependency: install it in a side environment and point `--mergekit` at its CLI, e.g.

    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python tools/parity_methods.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

The parents are a fine-tune family (a tiny qwen3 base from darwin_stream.demo, and copies with small
bf16 perturbations), so that task vectors are small as in real merges. Merges run with `dtype:
float32, out_dtype: bfloat16`; the contract is that at most 1e-4 of each tensor's elements differ
by more than one bf16 ulp. Random methods (della*) draw different masks by design: for them the
table gives the kept fraction of each child's task vector, which must agree in distribution.
Prints a markdown table (docs/methods.md holds the last one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import darwin_stream  # noqa: E402
from darwin_stream import demo  # noqa: E402

# method -> (YAML body in mergekit's form, random?)
CASES: dict[str, tuple[str, bool]] = {
    "nearswap": ("base_model: {a}\nmodels:\n  - model: {b}\nparameters: {{t: 0.001}}\n", False),
    "nuslerp": (
        "models:\n  - model: {b}\n    parameters: {{weight: 0.3}}\n  - model: {c}\n    parameters: {{weight: 0.7}}\n",
        False,
    ),
    "nuslerp_base": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.7}}\n",
        False,
    ),
    "nuslerp_rows": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.6}}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
        False,
    ),
    "multislerp": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.3}}\n  - model: {d}\n    parameters: {{weight: 0.2}}\n",
        False,
    ),
    "karcher": ("models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n", False),
    "karcher_base": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n", False),  # base appended
    "della": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.4, density: 0.4, epsilon: 0.2}}\n",
        True,
    ),
    "della_linear": (
        "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n"
        "  - model: {c}\n    parameters: {{weight: 0.4, density: 0.4, epsilon: 0.2}}\n",
        True,
    ),
    "sce": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\nparameters: {{select_topk: 0.3}}\n",
        False,
    ),
    "arcee_fusion": ("base_model: {a}\nmodels:\n  - model: {b}\n", False),
    "ram": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\nparameters: {{epsilon: 0.002}}\n", False),
    "ramplus_tl": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\n"
        "parameters: {{epsilon: 0.002, r: 0.5, alpha: 0.3}}\n",
        False,
    ),
}


def family(root: Path) -> dict[str, str]:
    """Base `a` and fine-tunes b, c, d: a + N(0, 0.002) (+ a shared direction for c, d), in bf16."""
    a = demo.build_model(root / "a", seed=1)
    out = {"a": str(a)}
    g = torch.Generator().manual_seed(7)
    shared: dict[str, torch.Tensor] = {}
    for k, name in enumerate("bcd"):
        d = root / name
        shutil.copytree(a, d)
        for f in sorted(d.glob("*.safetensors")):
            tensors = load_file(str(f))
            for t, x in tensors.items():
                if not x.is_floating_point():
                    continue
                s = shared.setdefault(t, torch.randn(x.shape, generator=g) * 0.002)
                noise = torch.randn(x.shape, generator=g) * 0.002 + (s if k else 0)
                # a sparse part, so that RAM's epsilon and sce's selection have something to find
                noise *= torch.rand(x.shape, generator=g) < 0.6
                tensors[t] = (x.float() + noise).to(x.dtype)
            save_file(tensors, str(f), metadata={"format": "pt"})
        out[name] = str(d)
    return out


def ordered(x: torch.Tensor) -> torch.Tensor:
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def read(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(mk: dict[str, torch.Tensor], ds: dict[str, torch.Tensor], base: dict[str, torch.Tensor], random: bool) -> dict:
    """Worst tensor's fraction of elements more than one bf16 ulp apart; for random methods, the
    kept fraction (child != base) and the L1 norm of the child's task vector, over all elements."""
    worst_frac, worst_ulp, worst_name = 0.0, 0, ""
    kept, l1, n = [0.0, 0.0], [0.0, 0.0], 0
    for name, x in mk.items():
        y = ds[name]
        if random:
            b = base[name].float()
            for j, c in enumerate((x.float(), y.float())):
                kept[j] += float((c != b).sum())
                l1[j] += float((c - b).abs().double().sum())
            n += x.numel()
            continue
        ulps = (ordered(x.float()) - ordered(y.float())).abs()
        frac = float((ulps > 1).double().mean())
        if frac >= worst_frac:
            worst_frac, worst_name = frac, name
        worst_ulp = max(worst_ulp, int(ulps.max()))
    out = {"tensors": len(mk), "missing": sorted(set(mk) ^ set(ds))}
    if random:
        out |= {"kept_mk": kept[0] / n, "kept_ds": kept[1] / n, "l1_ratio": l1[1] / max(l1[0], 1e-30)}
    else:
        out |= {"frac_gt_1ulp": worst_frac, "max_ulp": worst_ulp, "worst": worst_name}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default="mergekit-yaml", help="mergekit's CLI in its own environment")
    ap.add_argument("--work", default=None, help="where parents and children go (default: a temp dir)")
    ap.add_argument("methods", nargs="*", default=sorted(CASES))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="parity-"))
    parents = family(work / "parents") if not (work / "parents" / "d").exists() else {
        k: str(work / "parents" / k) for k in "abcd"
    }
    rows = []
    for case in args.methods:
        body, random = CASES[case]
        method = case.split("_base")[0].split("_rows")[0]
        text = f"merge_method: {method}\n" + body.format(**parents) + "dtype: float32\nout_dtype: bfloat16\n"
        yaml = work / f"{case}.yaml"
        yaml.write_text(text)
        mk_out, ds_out = work / f"mk-{case}", work / f"ds-{case}"
        for d in (mk_out, ds_out):
            shutil.rmtree(d, ignore_errors=True)
        run = subprocess.run([args.mergekit, str(yaml), str(mk_out)], capture_output=True, text=True)
        if run.returncode:
            rows.append({"case": case, "error": "mergekit: " + run.stderr.strip().splitlines()[-1]})
            continue
        try:
            darwin_stream.merge(yaml, ds_out)
        except Exception as e:  # a parity script reports every case, failing or not
            rows.append({"case": case, "error": f"darwin-stream: {e}"})
            continue
        rows.append({"case": case, **compare(read(mk_out), read(ds_out), read(Path(parents["a"])), random)})
    print("| case | tensors | worst fraction > 1 bf16 ulp | max ulp | result |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | | | | error: {r['error']} |")
        elif "kept_mk" in r:
            ok = abs(r["kept_ds"] - r["kept_mk"]) < 0.005 and abs(r["l1_ratio"] - 1) < 0.02 and not r["missing"]
            print(f"| {r['case']} | {r['tensors']} | random: kept {r['kept_ds']:.4f} vs mergekit {r['kept_mk']:.4f}, "
                  f"task-vector L1 ratio {r['l1_ratio']:.4f} | | {'ok' if ok else 'DIFFERS'} |")
        else:
            ok = r["frac_gt_1ulp"] <= 1e-4 and not r["missing"]
            print(f"| {r['case']} | {r['tensors']} | {r['frac_gt_1ulp']:.2e} ({r['worst']}) | {r['max_ulp']} | "
                  f"{'ok' if ok else 'DIFFERS'} |")
    (work / "parity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
