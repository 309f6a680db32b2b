"""`darwin-stream demo`: train a tiny base and two skilled parents, evolve their merge, show the table.

Everything is built locally (demo_models.build_demo: no network) under the work directory and kept,
so a second run goes straight to the evolution (and a finished evolution is resumed, which only
re-exports the child). The manifest is manifests/demo.yaml with its `demo-out/` paths pointed at the
work directory. The result is measured, never assumed: the table says whether the evolved child
beat the base, both parents and the 50/50 merge on the held-out split by more than one item per skill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darwin_stream.errors import EvolveError
from darwin_stream.evolution.report import EvolveReport

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "demo.yaml"
ROWS = (("base", "base"), ("parent A (addition)", "parent {root}/parent_a"),
        ("parent B (sorting)", "parent {root}/parent_b"), ("50/50 linear merge", "linear_50_50"),
        ("evolved child", "evolved child"))


@dataclass
class DemoResult:
    report: EvolveReport
    rows: list[tuple[str, dict[str, float], float]]  # label, held-out per skill, combined
    margin: float  # child's combined held-out score minus the best of the others
    one_item: float  # one held-out item per skill, on the combined score
    build_seconds: float

    @property
    def vigor(self) -> bool:
        return self.margin > self.one_item


def demo_manifest(root: Path, seed: int, edit: Callable[[str], str] | None = None) -> Path:
    """manifests/demo.yaml, its paths pointed at `root` and its search seeded with `seed`."""
    if not MANIFEST.is_file():
        raise EvolveError(f"demo: {MANIFEST} is missing; run the demo from a clone of darwin-stream")
    text = MANIFEST.read_text().replace("demo-out/", f"{root.as_posix()}/")
    if seed:
        text = text.replace("seed: 0}", f"seed: {seed}}}")
    if edit is not None:
        text = edit(text)
    path = root / f"demo-seed{seed}.yaml"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run_demo(workdir: str | Path = "demo-out", *, seed: int = 0, progress: Callable[[dict[str, Any]], None] | None = None,
             build_progress: Any = None, settings: Any = None, manifest_edit: Callable[[str], str] | None = None) -> DemoResult:
    """Build (or reuse) the models, then run (or resume) the evolution; `settings` and `manifest_edit`
    let tests build in seconds (fewer steps, a smaller search)."""
    import time

    from darwin_stream.demo_models import build_demo
    from darwin_stream.evolution.run import evolve

    root = Path(workdir)
    t0 = time.perf_counter()
    build = build_demo(root, seed=seed, progress=build_progress, settings=settings)
    built = time.perf_counter() - t0
    manifest = demo_manifest(root, seed, manifest_edit)
    run_dir = root / f"run-seed{seed}"
    report = evolve(manifest, run_dir, resume=(run_dir / "run.json").exists(), progress=progress)
    held = report.tables.get("heldout", {})
    rows = []
    for label, key in ROWS:
        r = held.get(key.format(root=root))
        if r is not None:
            rows.append((label, dict(r["tasks"]), float(r["fitness"])))
    child = rows[-1][2]
    margin = child - max(score for _, _, score in rows[:-1])
    n = len(_items(build.heldout[0]))
    return DemoResult(report, rows, margin, 1.0 / n, built)


def _items(task_file: Path) -> list[str]:
    return [ln for ln in task_file.read_text().splitlines()[1:] if ln.strip()]


def format_table(result: DemoResult) -> str:
    skills = list(result.rows[0][1]) if result.rows else []
    lines = [f"{'held-out exact match':<24}" + "".join(f"{s:>10}" for s in skills) + f"{'combined':>10}"]
    for label, per, combined in result.rows:
        lines.append(f"{label:<24}" + "".join(f"{per[s]:>10.3f}" for s in skills) + f"{combined:>10.3f}")
    verdict = "hybrid vigor" if result.vigor else "no hybrid vigor"
    lines.append(f"{verdict}: the child is {result.margin:+.3f} over the best of the others "
                 f"(one item per skill is {result.one_item:.3f})")
    return "\n".join(lines)
