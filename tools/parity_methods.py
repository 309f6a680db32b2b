"""Parity with mergekit 0.1.5 for every merge method: the same YAML, the same tiny parents, both
children compared tensor by tensor.

mergekit is not a dependency: install it in a side environment and point `--mergekit` at its CLI, e.g.

    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python tools/parity_methods.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

The parents are a fine-tune family (a tiny qwen3 base from darwin_stream.demo, and copies with small
bf16 perturbations), so that task vectors are small as in real merges. Merges run with `dtype:
float32, out_dtype: bfloat16`; the contract is that at most 1e-4 of each tensor's elements differ
by more than one bf16 ulp. Random methods (della*) draw different masks by design: for them the
table gives the kept fraction of each child's task vector, which must agree in distribution.
Tokenizer modes (tokenizer_source union/base/<model>, the tokenizer: section, chat_template) run
on parents whose vocabularies differ; their vocabulary rows are compared token by token.
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

W2 = "  - model: {b}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {c}\n    parameters: {{weight: 0.4, density: 0.3}}\n"

# case -> (YAML body in mergekit's form, random?); the method is the case name up to a _variant suffix
CASES: dict[str, tuple[str, bool]] = {
    # the ten methods darwin-stream had before these
    "linear": ("models:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n", False),
    "slerp": ("base_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.4}}\n", False),
    "task_arithmetic": ("base_model: {a}\nmodels:\n" + W2, False),
    "ties": ("base_model: {a}\nmodels:\n" + W2, False),
    "dare_linear": ("base_model: {a}\nmodels:\n" + W2, True),
    "dare_ties": ("base_model: {a}\nmodels:\n" + W2, True),
    "breadcrumbs": ("base_model: {a}\nmodels:\n" + W2, False),
    "breadcrumbs_ties": ("base_model: {a}\nmodels:\n" + W2, False),
    "model_stock": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\n", False),
    "passthrough": ("models:\n  - model: {b}\n", False),
    # mergekit 0.1.5's other ten
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
    "sce_all": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\n", False),
    "arcee_fusion": ("base_model: {a}\nmodels:\n  - model: {b}\n", False),
    "ram": ("base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\nparameters: {{epsilon: 0.002}}\n", False),
    "ramplus_tl": (
        "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n  - model: {d}\n"
        "parameters: {{epsilon: 0.002, r: 0.5, alpha: 0.3}}\n",
        False,
    ),
}


# Tokenizer modes (case -> YAML body): parents x, y, z whose vocabularies differ (demo.build_vocab_model).
LIN2 = "base_model: {x}\nmodels:\n  - model: {x}\n    parameters: {{weight: 0.3}}\n  - model: {y}\n    parameters: {{weight: 0.7}}\n"
LIN3 = LIN2 + "  - model: {z}\n    parameters: {{weight: 0.2}}\n"
TOKENIZER_CASES: dict[str, str] = {
    "tokenizer_union": "merge_method: linear\n" + LIN3 + "tokenizer_source: union\nchat_template: chatml\n",
    "tokenizer_union_slerp": "merge_method: slerp\nbase_model: {x}\nmodels:\n  - model: {x}\n  - model: {y}\n"
    "parameters: {{t: 0.4}}\ntokenizer_source: union\n",
    "tokenizer_base": "merge_method: linear\n" + LIN2 + "tokenizer_source: base\n",
    "tokenizer_model": "merge_method: linear\n" + LIN2 + "tokenizer_source: {y}\n",
    "tokenizer_tokens": "merge_method: linear\n" + LIN3 + "tokenizer:\n  source: union\n  tokens:\n"
    "    <|im_start|>: {{source: {z}, force: true}}\n    <tool>: {{source: {{kind: zero}}}}\n"
    "    <|im_end|>: {{source: {{kind: model_token, model: {x}, token: <|endoftext|>}}}}\n"
    "    <newtok>: {{source: {{kind: model_token, model: {y}, token_id: 5}}}}\nchat_template: auto\n",
    "chat_template_llama3": "merge_method: linear\nmodels:\n  - model: {x}\n    parameters: {{weight: 1.0}}\n"
    "chat_template: llama3\n",
}


def tokenizer_family(root: Path) -> dict[str, str]:
    """x: the demo vocabulary + <|im_start|>, <|im_end|>; y: another BPE (other ids, 15 new tokens),
    `zebra`, <tool>, <|im_end|>; z: a third BPE with <|im_start|>, <tool> and a chat template."""
    x = demo.build_vocab_model(root / "x", 1, special=("<|im_start|>", "<|im_end|>"))
    y = demo.build_vocab_model(root / "y", 2, extra_corpus="zebras and giraffes graze on the savanna. " * 3,
                               vocab_size=330, added=("zebra",), special=("<tool>", "<|im_end|>"))
    z = demo.build_vocab_model(root / "z", 3, extra_corpus="the tool calls a function. " * 3, vocab_size=325,
                               special=("<|im_start|>", "<tool>"),
                               chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return {"x": str(x), "y": str(y), "z": str(z)}


def compare_by_token(mk_dir: Path, ds_dir: Path) -> dict:
    """Like `compare`, with vocabulary rows matched by token: mergekit's union numbers the tokens
    it adds in an order that changes from run to run (darwin_stream/tokenizer/vocab.py)."""
    from transformers import AutoTokenizer

    tm, td = AutoTokenizer.from_pretrained(mk_dir), AutoTokenizer.from_pretrained(ds_dir)
    vm, vd = tm.get_vocab(), td.get_vocab()
    mk, ds = read(mk_dir), read(ds_dir)
    if set(vm) == set(vd):
        order = [vd[t] for t, _ in sorted(vm.items(), key=lambda kv: kv[1])]
        for name, x in mk.items():
            if x.dim() == 2 and x.shape[0] == len(vm) and ds[name].shape == x.shape:
                ds[name] = ds[name][order]
    row = compare(mk, ds, {}, False)
    vocab_rows = [n for n, x in mk.items() if x.dim() == 2 and x.shape[0] == len(vm)]
    row["vocab_rows"] = compare({n: mk[n] for n in vocab_rows}, {n: ds[n] for n in vocab_rows}, {}, False)["frac_gt_1ulp"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]

    def render(tok) -> str | None:
        # the tiny parents have no bos token, which llama3 and mistral templates use
        return tok.apply_chat_template(msgs, tokenize=False, bos_token="<s>") if tok.chat_template else None

    cfg = [json.loads((d / "config.json").read_text()) for d in (mk_dir, ds_dir)]
    return row | {
        "vocab": "same" if vm == vd else "same tokens" if set(vm) == set(vd) else "DIFFERS",
        "vocab_size": (cfg[0].get("vocab_size"), cfg[1].get("vocab_size")),
        "chat": "same" if render(tm) == render(td) else "DIFFERS",
    }


def run_tokenizer_case(case: str, parents: dict[str, str], work: Path, cli: str) -> dict:
    yaml = work / f"{case}.yaml"
    yaml.write_text(TOKENIZER_CASES[case].format(**parents) + "dtype: float32\nout_dtype: bfloat16\n")
    mk_out, ds_out = work / f"mk-{case}", work / f"ds-{case}"
    error = mergekit(cli, yaml, mk_out)
    if error:
        return {"case": case, "error": error}
    shutil.rmtree(ds_out, ignore_errors=True)
    try:
        darwin_stream.merge(yaml, ds_out)
    except Exception as e:  # a parity script reports every case, failing or not
        return {"case": case, "error": f"darwin-stream: {e}"}
    return {"case": case, **compare_by_token(mk_out, ds_out)}


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


def sce_ties(mk: dict, ds: dict, parents: dict[str, dict[str, torch.Tensor]], topk: float) -> dict:
    """Of the elements more than one ulp apart, how many tie with sce's variance threshold (where
    mergekit's topk keeps an arbitrary k of the tied and we keep them all), and how many of the rest
    nearly cancel (|out| < 1e-2 |b|: the weights, shifted ~1e-4 relative by those ties, decide them)."""
    apart = tied = cancelled = 0
    for name, x in mk.items():
        bad = (ordered(x.float()) - ordered(ds[name].float())).abs() > 1
        if not bad.any():
            continue
        b = parents["a"][name].float()
        var = torch.var(torch.stack([parents[k][name].float() - b for k in "bcd"]), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        tie = var == torch.sort(var.reshape(-1), descending=True).values[k - 1]
        apart += int(bad.sum())
        tied += int((bad & tie).sum())
        cancelled += int((bad & ~tie & (x.float().abs() < 1e-2 * b.abs())).sum())
    return {"apart": apart, "tied": tied, "cancelled": cancelled}


def fraction_apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of all elements more than one bf16 ulp apart."""
    bad = sum(int(((ordered(a[k].float()) - ordered(b[k].float())).abs() > 1).sum()) for k in a)
    return bad / max(sum(x.numel() for x in a.values()), 1)


def mergekit(cli: str, yaml: Path, out: Path) -> str | None:
    """Run mergekit; its last error line, or None."""
    shutil.rmtree(out, ignore_errors=True)
    run = subprocess.run([cli, str(yaml), str(out)], capture_output=True, text=True)
    return ("mergekit: " + (run.stderr.strip().splitlines() or ["failed"])[-1]) if run.returncode else None


def run_case(case: str, parents: dict[str, str], work: Path, cli: str, bf16: bool) -> dict:
    body, random = CASES[case]
    method = case.removesuffix("_base").removesuffix("_rows").removesuffix("_all")
    text = f"merge_method: {method}\n" + body.format(**parents) + "out_dtype: bfloat16\n"
    yaml = work / f"{case}.yaml"
    yaml.write_text(text + "dtype: float32\n")
    mk_out, ds_out = work / f"mk-{case}", work / f"ds-{case}"
    error = mergekit(cli, yaml, mk_out)
    if error:
        return {"case": case, "error": error}
    shutil.rmtree(ds_out, ignore_errors=True)
    try:
        darwin_stream.merge(yaml, ds_out)
    except Exception as e:  # a parity script reports every case, failing or not
        return {"case": case, "error": f"darwin-stream: {e}"}
    mk, ds = read(mk_out), read(ds_out)
    row = {"case": case, **compare(mk, ds, read(Path(parents["a"])), random)}
    if case == "sce":
        row |= sce_ties(mk, ds, {k: read(Path(p)) for k, p in parents.items()}, 0.3)
    if bf16 and not random:
        # mergekit rounding every step in bf16, against its own float32 child; ours computes in float32
        yaml16 = work / f"{case}-bf16.yaml"
        yaml16.write_text(text + "dtype: bfloat16\n")
        error = mergekit(cli, yaml16, work / f"mk16-{case}")
        if error is None:
            row |= {"bf16_mk": fraction_apart(read(work / f"mk16-{case}"), mk), "bf16_ds": fraction_apart(ds, mk)}
    return row


def print_table(rows: list[dict]) -> None:
    print("| case | tensors | worst tensor: fraction > 1 bf16 ulp | max ulp | bf16 run: mergekit / ours, fraction > 1 ulp from mergekit's float32 child | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | | | | | error: {r['error']} |")
            continue
        bf16 = f"{r['bf16_mk']:.2e} / {r['bf16_ds']:.2e}" if "bf16_mk" in r else ""
        if "kept_mk" in r:
            ok = abs(r["kept_ds"] - r["kept_mk"]) < 0.005 and abs(r["l1_ratio"] - 1) < 0.02 and not r["missing"]
            cell = f"random: kept {r['kept_ds']:.4f} vs mergekit {r['kept_mk']:.4f}, task-vector L1 ratio {r['l1_ratio']:.4f}"
            print(f"| {r['case']} | {r['tensors']} | {cell} | | | {'ok' if ok else 'DIFFERS'} |")
            continue
        ok = r["frac_gt_1ulp"] <= 1e-4 and not r["missing"] and r.get("bf16_ds", 0) <= r.get("bf16_mk", 1)
        note = ""
        if "vocab" in r:
            ok = ok and r["vocab"] != "DIFFERS" and r["chat"] == "same" and r["vocab_size"][0] == r["vocab_size"][1]
            note = (f"; vocabulary {r['vocab']} ({r['vocab_size'][1]} tokens), embedding and lm_head rows by token: "
                    f"{r['vocab_rows']:.2e} > 1 ulp, chat template {r['chat']}")
        if "tied" in r:
            note = f"; of {r['apart']} elements > 1 ulp, {r['tied']} tie at the threshold, {r['cancelled']} nearly cancel"
        print(f"| {r['case']} | {r['tensors']} | {r['frac_gt_1ulp']:.2e} ({r['worst']}) | {r['max_ulp']} | {bf16} | "
              f"{'ok' if ok else 'DIFFERS'}{note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default="mergekit-yaml", help="mergekit's CLI in its own environment")
    ap.add_argument("--work", default=None, help="where parents and children go (default: a temp dir)")
    ap.add_argument("--bf16", action="store_true", help="also run mergekit with dtype: bfloat16")
    ap.add_argument("methods", nargs="*", default=sorted(CASES) + list(TOKENIZER_CASES))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="parity-"))
    methods = [c for c in args.methods if c in CASES]
    rows = []
    if methods:
        if (work / "parents" / "d").exists():
            parents = {k: str(work / "parents" / k) for k in "abcd"}
        else:
            parents = family(work / "parents")
        rows += [run_case(case, parents, work, args.mergekit, args.bf16) for case in methods]
    tok_cases = [c for c in args.methods if c in TOKENIZER_CASES]
    if tok_cases:
        if (work / "parents" / "z").exists():
            vocab_parents = {k: str(work / "parents" / k) for k in "xyz"}
        else:
            vocab_parents = tokenizer_family(work / "parents")
        rows += [run_tokenizer_case(case, vocab_parents, work, args.mergekit) for case in tok_cases]
    print_table(rows)
    (work / "parity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
