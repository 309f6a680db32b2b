"""Small helpers shared by tests: reading checkpoints and comparing at bf16 resolution."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_all(directory: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bf16_ulp_mismatch(got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor | None = None) -> float:
    """Fraction of elements of `got` more than one bf16 ulp away from `ref` rounded to bf16.

    `terms` is the sum of the magnitudes of what was added to make each element (for a weighted
    sum, sum |w_i x_i|). Where the terms cancel almost exactly, float32 arithmetic is only good to
    about 2^-24 of them, which can be many bf16 ulps of a near-zero result; differences within
    4 * 2^-24 * terms are float32 rounding, not a wrong method, and are not counted.
    """
    a = got.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    b = ref.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    # Map sign-magnitude bit patterns onto a line so that adjacent floats differ by 1.
    a = torch.where(a < 0, -(a & 0x7FFF), a)
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    bad = (a - b).abs() > 1
    if terms is not None:
        bad &= (got.double() - ref.double()).abs() > 4 * 2.0**-24 * terms.double()
    return bad.float().mean().item() if a.numel() else 0.0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return out


def _anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_private_memory(argv: list[str], **kwargs) -> tuple[int, int]:
    """Run a command; return (exit code, peak RssAnon summed over its process tree)."""
    import subprocess
    import time

    proc = subprocess.Popen(argv, **kwargs)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_anon(p) for p in _tree(proc.pid)))
        time.sleep(0.01)
    return proc.returncode, peak


TOY_MANIFEST = """\
# a comment
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: {t}
dtype: bfloat16
"""


def build_toy(root: Path, seed: int) -> Path:
    """A one-layer llama-shaped parent: a 512x96 tensor (many chunks under a small budget) and a norm."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"model.layers.0.mlp.up_proj.weight": (torch.randn(512, 96, generator=g) * 0.02).bfloat16(),
               "model.norm.weight": torch.randn(96, generator=g).bfloat16()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (root / "tokenizer.json").write_text("{}")
    return root


DATA = Path(__file__).resolve().parents[1] / "darwin_stream" / "score" / "data"


def evolve_yaml(trio, *, genes: str | None = None, search: str = "{popsize: 4, max_generations: 2, sigma0: 0.3}",
                fitness: str | None = None, method: str = "task_arithmetic") -> str:
    base, a, b = trio
    genes = genes or (
        f"    - {{name: a, param: weight, model: {a}, granularity: layer, filter: [self_attn, mlp], bounds: [0, 1.5]}}\n"
        f"    - {{name: b, param: weight, model: {b}, granularity: role, filter: [self_attn, mlp], bounds: [0, 1.5]}}\n")
    fitness = fitness or (f"    tasks: [{DATA / 'capitals_choice.jsonl'}]\n"
                          f"    heldout: [{DATA / 'corpus_perplexity.jsonl'}]\n")
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
            f"dtype: float32\nevolve:\n  genes:\n{genes}  search: {search}\n  fitness:\n{fitness}"
            "  backend: {name: hf, dtype: float32}\n")


def wait_for_history(run_dir: Path, n: int, proc: subprocess.Popen, limit: float = 240) -> None:
    """Wait until an evolve subprocess has journalled `n` candidates (it must still be running)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        p = run_dir / "history.jsonl"
        if p.exists() and p.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the run did not get that far")


def local_merge(root: Path, manifest: str, parents: tuple[Path, Path], **options) -> tuple[Path, Path]:
    """`manifest` (a template with {a} and {b}) for the two parents, merged to `root`/child: the local
    child a bucket or zarr child is compared with. Returns the manifest's path and the child's."""
    from darwin_stream import merge

    m = root / "m.yaml"
    m.write_text(manifest.format(a=parents[0], b=parents[1]))
    return m, Path(merge(m, root / "child", **options).out)

