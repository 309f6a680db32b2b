"""The evolution demo's models and data: a tiny Qwen3 base and two parents that each add one skill.

`darwin-stream demo` must show hybrid vigor on two CPU cores in minutes: a child evolved from two
parents beats the base, both parents and their 50/50 merge. That only works when each parent adds
skill the base lacks, so the base is stopped while it is still learning both skills, and each
parent is fine-tuned gently (lr 1e-4: at 5e-4 the parents leave the base's basin and every merge
scores about 0, shared/notes/evolution-demo.md) on its own skill only. docs/evolution-demo-design.md
records the designs tried and what mattered.

Everything is built here from a seed, with no network: a character tokenizer saved in Hugging
Face's format, item generators for the two skills (train, fitness and held-out items, disjoint),
the training loop, and the scorer's JSONL task files. `build_demo` reuses what is already built
with the same settings, so a second demo goes straight to the evolution.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from darwin_stream.errors import EvolveError
from darwin_stream.threads import torch_threads

# Bumped whenever the meaning of a setting changes, so that an old build is never trusted.
BUILD_FORMAT = 1

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)
CHARS = list("0123456789+=>:*-") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "\n"]
VOCAB = SPECIALS + CHARS
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}

Progress = Callable[[str, int, int], None]  # (stage, steps done, steps in the stage)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def save_tokenizer(out_dir: str | Path) -> None:
    """A character tokenizer as a PreTrainedTokenizerFast, loadable offline by AutoTokenizer.

    A BPE model with no merges splits text into characters; the post-processor prepends <bos>, so
    `tokenizer(prompt)["input_ids"]` (how the scorer tokenizes a prompt) is [BOS] + encode(prompt),
    the exact prefix the models are trained on.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=dict(TOKEN_ID), merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    tok.decoder = decoders.Fuse()  # characters join with nothing between them
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)


def encode(text: str) -> list[int]:
    """Token ids of `text` without special tokens (what the saved tokenizer gives, checked by a test)."""
    return [TOKEN_ID.get(c, UNK) for c in text]


# ---------------------------------------------------------------------------------------------
# Skills
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skill:
    """One skill: a generator of (prompt, answer) items, and how long an answer can be.

    kind "add": `a+b=` -> a+b, each operand with a digit count drawn from [lo, hi].
    kind "reverse": `s>` -> s reversed, s of lo..hi letters.
    kind "sort": `s:` -> the letters of s sorted, s of lo..hi letters.
    """

    name: str
    kind: str
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> tuple[str, str]:
        if self.kind == "add":
            a, b = (_number(rng, rng.randint(self.lo, self.hi)) for _ in range(2))
            return f"{a}+{b}=", str(a + b)
        s = "".join(rng.choice(CHARS[16:42]) for _ in range(rng.randint(self.lo, self.hi)))
        if self.kind == "reverse":
            return f"{s}>", s[::-1]
        if self.kind == "sort":
            return f"{s}:", "".join(sorted(s))
        raise EvolveError(f"unknown demo skill kind {self.kind!r}; expected add, reverse or sort")

    @property
    def max_tokens(self) -> int:
        """Answer characters at most, plus one for the end of sequence."""
        return (self.hi + 1 if self.kind == "add" else self.hi) + 1


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


@dataclass(frozen=True)
class Splits:
    """The fitness and held-out items of one skill, and the prompts training must never see."""

    fitness: list[tuple[str, str]]
    heldout: list[tuple[str, str]]

    @property
    def reserved(self) -> frozenset[str]:
        return frozenset(p for p, _ in self.fitness + self.heldout)


def make_splits(skill: Skill, seed: int, n_fitness: int, n_heldout: int) -> Splits:
    """Distinct prompts drawn from the seed: the first n_fitness are fitness, the next held-out."""
    rng = random.Random(f"darwin-demo:{seed}:{skill.name}:eval")
    seen: dict[str, str] = {}
    for _ in range(200 * (n_fitness + n_heldout)):
        if len(seen) == n_fitness + n_heldout:
            break
        prompt, answer = skill.sample(rng)
        seen.setdefault(prompt, answer)
    else:
        raise EvolveError(f"skill {skill.name}: cannot draw {n_fitness + n_heldout} distinct items")
    items = list(seen.items())
    return Splits(fitness=items[:n_fitness], heldout=items[n_fitness:])


def train_items(skill: Skill, splits: Splits, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n training items of `skill`, none of whose prompts is a fitness or held-out prompt."""
    reserved = splits.reserved
    out: list[tuple[str, str]] = []
    while len(out) < n:
        item = skill.sample(rng)
        if item[0] not in reserved:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One training run: steps, peak learning rate, warm-up steps, and the skill mix it samples."""

    steps: int
    lr: float
    warmup: int
    mix: tuple[float, float]  # sampling weights of skills A and B
    final_lr_frac: float = 0.1  # the cosine ends at this fraction of lr


@dataclass(frozen=True)
class DemoSettings:
    """Every number a build depends on; its hash names the build (see `build_demo`)."""

    skill_a: Skill = Skill("skill_a", "add", 1, 3)
    skill_b: Skill = Skill("skill_b", "sort", 6, 12)
    n_fitness: int = 150
    n_heldout: int = 150
    batch: int = 128
    model: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=64, tie_word_embeddings=True,
        )
    )
    # Constant lr after warm-up: the base is stopped mid-learning, and a cosine would finish it.
    base: Stage = Stage(steps=400, lr=1e-3, warmup=50, mix=(0.7, 0.3), final_lr_frac=1.0)
    parent_a: Stage = Stage(steps=300, lr=1e-4, warmup=20, mix=(1.0, 0.0))
    parent_b: Stage = Stage(steps=300, lr=1e-4, warmup=20, mix=(0.0, 1.0))

    def skills(self) -> tuple[Skill, Skill]:
        return self.skill_a, self.skill_b

    def digest(self, seed: int, part: str) -> str:
        """Hash of what `part` depends on: the base's settings for all, plus its own stage."""
        common = {k: v for k, v in asdict(self).items() if k not in ("base", "parent_a", "parent_b")}
        deps = {"tasks": [], "base": ["base"], "A": ["base", "parent_a"], "B": ["base", "parent_b"]}[part]
        data = {"format": BUILD_FORMAT, "seed": seed, "part": part, **common, **{k: asdict(self)[k] for k in deps}}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def with_steps(settings: DemoSettings, base: int, parents: int) -> DemoSettings:
    """The same design with other step counts (tests build in seconds with a few steps)."""
    return replace(
        settings,
        base=replace(settings.base, steps=base, warmup=min(settings.base.warmup, base)),
        parent_a=replace(settings.parent_a, steps=parents, warmup=min(settings.parent_a.warmup, parents)),
        parent_b=replace(settings.parent_b, steps=parents, warmup=min(settings.parent_b.warmup, parents)),
    )


# ---------------------------------------------------------------------------------------------
# Models and training
# ---------------------------------------------------------------------------------------------


def new_model(settings: DemoSettings, seed: int) -> Any:
    """A freshly initialised float32 Qwen3ForCausalLM (about 1 M parameters with the defaults)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own progress, not shard-writing bars
    config = Qwen3Config(
        vocab_size=len(VOCAB), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **settings.model
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def one_thread() -> Iterator[None]:
    """One torch thread: on the shared 2-core machine a step took 3.4 s with 2 threads, 0.20 s with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def collate(items: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the positions whose next token is scored.

    A sequence is [BOS] prompt answer [EOS]; only the answer and EOS are learned, which is what the
    scorer asks for (greedy continuation of `tokenizer(prompt)` until EOS).
    """
    seqs = [([BOS, *encode(p)], [*encode(a), EOS]) for p, a in items]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    target = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
    for r, (p, a) in enumerate(seqs):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        attn[r, : len(p) + len(a)] = 1
        target[r, len(p) - 1 : len(p) + len(a) - 1] = True  # logits at i predict token i+1
    return ids, attn, target


def lr_at(stage: Stage, step: int) -> float:
    """Linear warm-up to stage.lr, then a cosine down to final_lr_frac * lr."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    floor = stage.final_lr_frac
    return stage.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: Any, stage: Stage, sampler: Callable[[int], list[tuple[str, str]]], batch: int,
          *, name: str = "train", progress: Progress | None = None,
          on_step: Callable[[int, Any], None] | None = None) -> list[float]:
    """AdamW (0.9, 0.98), weight decay 0.01, gradient clip 1; returns the loss of every step.

    `on_step(steps_done, model)` runs after every step (the design experiments snapshot the base).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses = []
    for step in range(stage.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(stage, step)
        ids, attn, target = collate(sampler(batch))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[target], ids[:, 1:][target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % 25 == 0:
            progress(name, step + 1, stage.steps)
        if on_step:
            on_step(step + 1, model)
    model.eval()
    return losses


def mix_sampler(settings: DemoSettings, splits: dict[str, Splits], mix: tuple[float, float],
                rng: random.Random) -> Callable[[int], list[tuple[str, str]]]:
    """Batches whose items are skill A or B with probabilities `mix` (fitness/held-out excluded)."""
    skills = settings.skills()

    def sample(n: int) -> list[tuple[str, str]]:
        picks = rng.choices((0, 1), weights=mix, k=n)
        out: list[tuple[str, str]] = []
        for k in (0, 1):
            out += train_items(skills[k], splits[skills[k].name], rng, picks.count(k))
        rng.shuffle(out)
        return out

    return sample


# ---------------------------------------------------------------------------------------------
# Fast greedy exact match (what the scorer measures, batched by prompt length, no padding)
# ---------------------------------------------------------------------------------------------


class GreedyEval:
    """Greedy exact match of a model on item lists, in batches of equal-length prompts.

    Equal lengths need no padding, so a batch computes what one-at-a-time greedy decoding computes
    (the scorer's definition); 300 items take about half a second at one thread.
    """

    def __init__(self, tasks: dict[str, list[tuple[str, str]]], max_tokens: dict[str, int]):
        self.tasks = tasks
        self.max_tokens = max_tokens
        # Per task: (item indices, prompt ids) for each prompt length.
        self.groups: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
        for name, items in tasks.items():
            by_len: dict[int, list[int]] = {}
            for i, (p, _) in enumerate(items):
                by_len.setdefault(len(p), []).append(i)
            self.groups[name] = [
                (idx, torch.tensor([[BOS, *encode(items[i][0])] for i in idx])) for idx in by_len.values()
            ]

    @torch.no_grad()
    def outputs(self, model: Any, name: str) -> list[list[int]]:
        """Generated ids of every item of task `name`, in item order, cut at EOS or newline."""
        out: list[list[int]] = [[] for _ in self.tasks[name]]
        for idx, ids in self.groups[name]:
            for i, row in zip(idx, _greedy(model, ids, self.max_tokens[name]), strict=True):
                out[i] = _cut(row)
        return out

    def __call__(self, model: Any) -> dict[str, float]:
        scores = {}
        for name, items in self.tasks.items():
            got = self.outputs(model, name)
            scores[name] = sum(g == encode(a) for g, (_, a) in zip(got, items, strict=True)) / len(items)
        return scores


def _greedy(model: Any, ids: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Greedy continuation of a batch of equal-length prompts, with the KV cache."""
    out = model(input_ids=ids, use_cache=True)
    cache, gen = out.past_key_values, []
    nxt = out.logits[:, -1].argmax(-1)
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(max_tokens):
        gen.append(nxt)
        done |= (nxt == EOS) | (nxt == TOKEN_ID["\n"])
        if bool(done.all()) or len(gen) == max_tokens:
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    return torch.stack(gen, 1).tolist()


def _cut(row: list[int]) -> list[int]:
    """What the scorer compares: ids up to the first EOS or newline, special tokens dropped (its
    decode skips them)."""
    for i, t in enumerate(row):
        if t in (EOS, TOKEN_ID["\n"]):
            row = row[:i]
            break
    return [t for t in row if t not in (PAD, BOS, UNK)]


# ---------------------------------------------------------------------------------------------
# Task files and the build
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoBuild:
    """Where a built demo lies, and what building it cost.

    `stages` maps base, A, B to {"reused": bool, "wall_s", "cpu_s", "fitness": {...}, "heldout": {...}}.
    """

    root: Path
    base: Path
    parents: dict[str, Path]
    tasks: Path
    fitness: list[Path]
    heldout: list[Path]
    settings: DemoSettings
    seed: int
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def write_task(path: Path, name: str, skill: Skill, items: list[tuple[str, str]]) -> None:
    """A task file in the scorer's format: an options line, then one {"prompt", "answer"} per item."""
    head = {"task": {"name": name, "kind": "generate", "max_tokens": skill.max_tokens, "stop": ["\n"]}}
    lines = [json.dumps(head)] + [json.dumps({"prompt": p, "answer": a}) for p, a in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_tasks(dest: Path, settings: DemoSettings, splits: dict[str, Splits]) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("fitness", "heldout"):
        (tmp / split).mkdir(parents=True)
        for skill in settings.skills():
            items = getattr(splits[skill.name], split)
            write_task(tmp / split / f"{skill.name}.jsonl", skill.name, skill, items)
    _replace_dir(tmp, dest)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Put a complete directory in place under its final name (a killed build leaves only tmp)."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _save_model(model: Any, dest: Path) -> None:
    """save_pretrained (safetensors) with tokenizer and greedy generation config, then one rename."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tmp)
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _replace_dir(tmp, dest)


def _load_model(path: Path) -> Any:
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()


def _read_record(root: Path) -> dict[str, Any]:
    p = root / "build.json"
    if not p.is_file() or p.stat().st_size > 1 << 20:
        return {}
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(root: Path, record: dict[str, Any]) -> None:
    tmp = root / f".build.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / "build.json")


def build_demo(out_dir: str | Path, *, seed: int = 0, settings: DemoSettings | None = None,
               progress: Progress | None = None) -> DemoBuild:
    """Build (or reuse) the demo's tasks, base and parents A and B under `out_dir`.

    Layout: tasks/{fitness,heldout}/skill_{a,b}.jsonl, base/, parent_a/, parent_b/ (save_pretrained
    safetensors checkpoints, float32, with the tokenizer) and build.json. A part is reused when
    build.json records the hash of its settings (seed, skills, sizes, model, and its training stages)
    and its directory exists; each part appears under its final name only once complete, and
    build.json is updated after it, so a killed build is resumed by rebuilding just the part it was on.
    """
    settings = settings or DemoSettings()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise EvolveError(f"{root}: the demo's build directory is a file")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp-*"):  # left by a killed build; never trusted, never finished
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    record = _read_record(root)
    skills = settings.skills()
    splits = {s.name: make_splits(s, seed, settings.n_fitness, settings.n_heldout) for s in skills}
    build = DemoBuild(
        root=root, base=root / "base", parents={"A": root / "parent_a", "B": root / "parent_b"},
        tasks=root / "tasks", fitness=[root / "tasks" / "fitness" / f"{s.name}.jsonl" for s in skills],
        heldout=[root / "tasks" / "heldout" / f"{s.name}.jsonl" for s in skills], settings=settings, seed=seed,
    )
    if record.get("tasks", {}).get("hash") != settings.digest(seed, "tasks") or not build.tasks.is_dir():
        _write_tasks(build.tasks, settings, splits)
        record["tasks"] = {"hash": settings.digest(seed, "tasks")}
        _write_record(root, record)
    evaluate = GreedyEval(
        {f"{split}/{s.name}": getattr(splits[s.name], split) for split in ("fitness", "heldout") for s in skills},
        {f"{split}/{s.name}": s.max_tokens for split in ("fitness", "heldout") for s in skills},
    )
    parts = [("base", build.base, None, settings.base), ("A", build.parents["A"], build.base, settings.parent_a),
             ("B", build.parents["B"], build.base, settings.parent_b)]
    for part, dest, start, stage in parts:
        build.stages[part] = _build_part(root, record, part, dest, start, stage, settings=settings, seed=seed,
                                         splits=splits, evaluate=evaluate, progress=progress)
        if part == "base" and not build.stages[part]["reused"]:
            # Parents fine-tuned from an older base are not children of this one.
            record.pop("A", None)
            record.pop("B", None)
    return build


def _build_part(root: Path, record: dict[str, Any], part: str, dest: Path, start: Path | None, stage: Stage, *,
                settings: DemoSettings, seed: int, splits: dict[str, Splits], evaluate: GreedyEval,
                progress: Progress | None) -> dict[str, Any]:
    """Train one model (from scratch, or from `start`) unless build.json says it is already built."""
    digest = settings.digest(seed, part)
    done = record.get(part, {})
    if done.get("hash") == digest and (dest / "config.json").is_file():
        return {**done, "reused": True}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch_threads(1):
        model = new_model(settings, seed) if start is None else _load_model(start)
        rng = random.Random(f"darwin-demo:{seed}:{part}:train")
        losses = train(model, stage, mix_sampler(settings, splits, stage.mix, rng), settings.batch,
                       name=part, progress=progress)
        scores = evaluate(model)
    _save_model(model, dest)
    entry = {"hash": digest, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
             "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4), "scores": scores}
    record[part] = entry
    _write_record(root, record)
    return {**entry, "reused": False}
