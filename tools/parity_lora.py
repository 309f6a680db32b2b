"""`model+lora` against mergekit: the same passthrough of a tiny base with a PEFT adapter, both ways.

Why this exists: darwin-stream applies a LoRA by rows as the parent is read (darwin_stream/lora.py);
mergekit loads the base in transformers, merges with PEFT's merge_and_unload and saves a copy. The
children must agree. mergekit lives in a side environment (it pins its own torch and transformers),
so it runs as a subprocess:

    .venv/bin/python tools/parity_lora.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

Measured 2026-12-01, mergekit 0.1.5 with PEFT 0.21.2: 0 of 673,408 elements differ (bf16 child),
and both are within 4.8e-4 of the float64 reference W + alpha/r * B @ A (one bf16 rounding).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

YAML = "merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: float32\nout_dtype: bfloat16\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="the mergekit-yaml executable of the side environment")
    args = ap.parse_args()
    import darwin_stream as ds
    from darwin_stream.demo import build_model
    from tests.helpers import read_all
    from tests.test_lora import make_adapter, reference

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_model(root / "base", seed=1)
        adapter = make_adapter(base, root / "adapter", seed=0, embed=False)  # mergekit's PEFT path: linear LoRAs
        (root / "m.yaml").write_text(YAML.format(base=base, adapter=adapter))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([args.mergekit, str(root / "m.yaml"), str(root / "mk"), "--lora-merge-cache",
                        str(root / "cache")], check=True, env=env, capture_output=True)
        ds.merge(root / "m.yaml", root / "ds")
        ours, theirs, ref = read_all(root / "ds"), read_all(root / "mk"), reference(base, adapter)
        differ = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
        total = sum(t.numel() for t in ours.values())
        err = {name: max(float((t[k].double() - ref[k]).abs().max()) for k in t) for name, t in
               (("darwin-stream", ours), ("mergekit", theirs))}
    print(f"elements differing: {differ} of {total}; max |child - float64|: "
          + ", ".join(f"{k} {v:.3g}" for k, v in err.items()))
    return 0 if differ == 0 and set(ours) == set(theirs) and torch.isfinite(torch.tensor(list(err.values()))).all() else 1


if __name__ == "__main__":
    sys.exit(main())
