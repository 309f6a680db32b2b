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
from typing import Any

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
    "tokenizer_pad": "merge_method: linear\n" + LIN3 + "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n",
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
        for name, x in mk.items():  # a padded vocabulary (pad_to_multiple_of) keeps its padding rows in place
            if x.dim() == 2 and len(vm) <= x.shape[0] < len(vm) + 4096 and ds[name].shape == x.shape:
                ds[name] = ds[name][order + list(range(len(vm), x.shape[0]))]
    row = compare(mk, ds, {}, False)
    vocab_rows = [n for n, x in mk.items() if x.dim() == 2 and len(vm) <= x.shape[0] < len(vm) + 4096]
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


def split_ties(values: torch.Tensor, skip: int, take: int) -> torch.Tensor:
    """The elements equal to a boundary value of the window of descending ranks (skip, skip + take]
    whose tie group the window splits: there mergekit's sort picks an undefined subset of the tied
    and we the first in flat order, the one difference the contract allows a selection."""
    flat = values.reshape(-1)
    desc = torch.sort(flat, descending=True).values
    out = torch.zeros_like(flat, dtype=torch.bool)
    for rank in ([skip] if skip > 0 else []) + ([skip + take - 1] if take > 0 else []):
        v = desc[rank]
        tied = flat == v
        above = int((flat > v).sum())
        kept = max(0, min(skip + take, above + int(tied.sum())) - max(skip, above))
        if 0 < kept < int(tied.sum()):
            out |= tied
    return out.reshape(values.shape)


# case -> per-model (density, gamma) of its selection, or "sce" for sce's variance selection
SELECTIONS: dict[str, Any] = {
    "ties": [(0.5, None), (0.3, None)],
    "breadcrumbs": [(0.5, 0.01), (0.3, 0.01)],
    "breadcrumbs_ties": [(0.5, 0.01), (0.3, 0.01)],
    "sce": "sce",
}


def tied_at_thresholds(case: str, name: str, parents: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """Elements of tensor `name` that tie at a threshold of the case's selection (any model)."""
    b = parents["a"][name].float()
    if SELECTIONS[case] == "sce":
        var = torch.var(torch.stack([parents[k][name].float() - b for k in "bcd"]), dim=0, unbiased=False)
        return split_ties(var, 0, int(torch.count_nonzero(var) * 0.3))
    out = torch.zeros_like(b, dtype=torch.bool)
    for k, (density, gamma) in zip("bc", SELECTIONS[case], strict=True):
        mag = (parents[k][name].float() - b).abs()
        n = mag.numel()
        if gamma is None:
            skip, take = 0, max(1, int(density * n))
        else:
            target, n_top = int(density * n), int(gamma * n)
            n_bot = max(0, n - target - n_top)
            skip, take = n - n_bot - target, target
        out |= split_ties(mag, skip, take)
    return out


def sce_with_mergekit_choice(name: str, parents: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """sce in float64 with mergekit's own selection (its float32 variance and `torch.topk`, which
    picks among tied elements in an order of its own): what darwin-stream's sce gives if it chose the
    tied elements as mergekit does. sce's weights are tensor-wide (mean(d_i²) over the selection), so
    which tied elements are chosen moves every element a little; this isolates that from the rest."""
    b = parents["a"][name].double()
    tvs = torch.stack([parents[k][name].double() - b for k in "bcd"])
    var = torch.var(tvs.float(), dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * 0.3)
    mask = torch.zeros(var.numel(), dtype=torch.float64)
    if k:
        mask[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    tvs = tvs * mask.reshape(var.shape).unsqueeze(0)
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).double()
    erase = (tvs.sign() == majority).double()
    w = tvs.square().reshape(tvs.shape[0], -1).mean(1)
    w = torch.ones_like(w) / w.numel() if abs(float(w.sum())) < 1e-6 else w / w.sum()
    ew = w.reshape(-1, *([1] * b.dim())) * erase
    return b + (tvs * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def selection_ties(case: str, mk: dict, ds: dict, parents: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Of the elements more than one ulp apart, how many tie at a threshold; and the worst tensor's
    fraction of elements apart among those that do not (the contract's 1e-4 applies to them)."""
    apart = tied = 0
    worst, worst_name = 0.0, ""
    for name, x in mk.items():
        bad = (ordered(x.float()) - ordered(ds[name].float())).abs() > 1
        tie = tied_at_thresholds(case, name, parents)
        apart += int(bad.sum())
        tied += int((bad & tie).sum())
        frac = float((bad & ~tie).sum()) / max(int((~tie).sum()), 1)
        if frac >= worst:
            worst, worst_name = frac, name
    out = {"apart": apart, "tied": tied, "untied_frac": worst, "untied_worst": worst_name}
    if case == "sce":
        out["same_choice_frac"] = max(
            float(((ordered(x.float()) - ordered(sce_with_mergekit_choice(n, parents).float())).abs() > 1).double().mean())
            for n, x in mk.items())
    return out


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
    if case in SELECTIONS:
        row |= selection_ties(case, mk, ds, {k: read(Path(p)) for k, p in parents.items()})
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
            # the contract: a selection may differ only on elements tied at a threshold
            ok = r["untied_frac"] <= 1e-4 and not r["missing"] and r.get("bf16_ds", 0) <= r.get("bf16_mk", 1)
            note = (f"; of {r['apart']} elements > 1 ulp, {r['tied']} tie at a threshold; the others: "
                    f"{r['untied_frac']:.2e} of the worst tensor ({r['untied_worst']})")
            if "same_choice_frac" in r:  # the others come from the weights: same tie choice, same child
                ok = ok or (r["same_choice_frac"] <= 1e-4 and not r["missing"])
                note += (f"; with mergekit's choice among the tied (float64 reference): "
                         f"{r['same_choice_frac']:.2e} of the worst tensor")
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
