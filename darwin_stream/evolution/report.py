"""What a run leaves for people: fitness.png, genome.png, the score table and the child's model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darwin_stream.evolution.history import Candidate


@dataclass
class EvolveReport:
    """`darwin-stream evolve --json` prints the first eight fields (the issue's contract) and the rest."""

    best_fitness: float
    heldout: dict[str, Any]
    generations: int
    evaluations: int
    run_dir: str
    child_dir: str
    genome: list[float] = field(default_factory=list)
    fitness: dict[str, Any] = field(default_factory=dict)  # the same table on the fitness split
    scored_evaluations: int = 0  # candidates actually scored (not served from the genome cache)
    seconds: dict[str, float] = field(default_factory=dict)
    subset: dict[str, Any] | None = None
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> model -> {tasks, fitness}
    interrupted: bool = False
    wall_s: float = 0.0  # the whole call, planning and scoring the references included
    peak_anon_bytes: int = 0  # peak RssAnon of this process (the transformers backend's model counts)
    baseline_anon_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # per scorer: busy seconds, utilisation over the scoring span, jobs, and each job's busy interval
    # (scorer, label, start, end; seconds on the run's clock): scorers.BusyLog.summary
    scorers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_stats(history: list[Candidate]) -> list[tuple[int, float, float]]:
    """(generation, best so far, mean) per generation."""
    out = []
    best = float("-inf")
    gens = sorted({c.generation for c in history})
    for g in gens:
        fs = [c.fitness for c in history if c.generation == g]
        best = max(best, *fs)
        out.append((g, best, sum(fs) / len(fs)))
    return out


def plot_fitness(history: list[Candidate], parents: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = generation_stats(history)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if stats:
        gens = [s[0] for s in stats]
        ax.plot(gens, [s[1] for s in stats], marker="o", label="best so far")
        ax.plot(gens, [s[2] for s in stats], marker=".", linestyle="--", label="generation mean")
    for i, (name, f) in enumerate(parents.items()):
        # "parent /long/path/to/parent_a" -> "parent parent_a": the legend must not cover the curve
        label = " ".join(part.rstrip("/").rsplit("/", 1)[-1] for part in name.split(" ", 1))
        ax.axhline(f, color=f"C{i + 2}", linestyle=":", label=label)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.set_title("darwin-stream evolve")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_genome(cols: list[str], rows: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(cols) + 2), max(3.0, 0.35 * len(rows) + 1.5)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [str(i) for i in range(len(rows))], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("best genome")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model (base, parents, 50/50, child), one column per task plus combined."""
    tasks: list[str] = []
    for r in rows.values():
        for t in r["tasks"]:
            if t not in tasks:
                tasks.append(t)
    lines = ["| model | " + " | ".join(tasks) + " | combined |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in rows.items():
        cells = [f"{r['tasks'].get(t, float('nan')):.3f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['fitness']:.3f} |")
    return "\n".join(lines)


def model_card(base_card: str, *, genome_text: str, fitness_rows: dict, heldout_rows: dict,
               generations: int, evaluations: int) -> str:
    """The merge's own card, with the evolution's lineage, genome, curve and scores added."""
    parts = [base_card.rstrip(), "", "## Evolution", "",
             f"Found by `darwin-stream evolve`: CMA-ES over {generations} generations, {evaluations} candidates.",
             "", "![fitness](fitness.png)", "", "### Genome", "", "```", genome_text, "```", ""]
    parts += ["### Fitness split", "", score_table(fitness_rows), ""]
    if heldout_rows:
        parts += ["### Held-out split (never optimised)", "", score_table(heldout_rows), ""]
    return "\n".join(parts)
