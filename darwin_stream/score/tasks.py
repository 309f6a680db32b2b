"""Tasks: JSONL files of items, their options, and the metrics computed from a backend's answers.

A task file holds one JSON object per line. Its options are declared in the file itself, on an
optional first line of the form `{"task": {...}}`, so that a task travels as one file and can never
be separated from the settings its numbers depend on. Without that line the kind is inferred from the
first item's keys (`choices` -> choice, `text` -> perplexity, otherwise generate).

Scoring is expressed in token ids, not strings: every backend is handed the same ids (tokenized
here, once, with the model's own tokenizer), so vLLM and transformers score identical sequences and
their numbers can be compared directly.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from darwin_stream.bounded import show
from darwin_stream.errors import ScoreError

KINDS = ("choice", "generate", "perplexity")
METRICS = {
    "choice": ("acc", "acc_norm"),
    "generate": ("exact_match",),
    # Perplexity is lower-is-better; fitness needs higher-is-better. inv_perplexity = exp(-mean NLL)
    # = 1/perplexity, the geometric-mean probability per token: in (0, 1] like an accuracy, so it
    # mixes sensibly in a weighted mean. neg_nll (= -mean NLL) is offered for those who prefer logs.
    "perplexity": ("inv_perplexity", "neg_nll"),
}
# Bounded like every other read: 256 MiB holds a million items of a benchmark's size (MMLU's
# 14k test items are 8 MB as JSONL); anything larger is not a task file.
MAX_TASK_BYTES = 256 * 2**20
OPTION_KEYS = {"name", "kind", "metric", "fewshot", "max_tokens", "weight", "extract", "stop", "limit"}


class Backend(Protocol):
    """What a task needs from a model: log-probabilities of given tokens, and greedy text."""

    name: str

    def token_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """For each sequence, log P(seq[i] | seq[:i]) for i = 1 .. len-1 (one forward pass each)."""
        ...

    def generate(self, seqs: list[list[int]], max_tokens: int, stop: list[str]) -> list[str]:
        """Greedy continuation of each sequence, cut before the first stop string."""
        ...


@dataclass
class Task:
    name: str
    kind: str
    items: list[dict[str, Any]]
    metric: str
    fewshot: str = ""  # prefix prepended to every prompt (choice, generate) or conditioned on (perplexity)
    max_tokens: int = 32  # generate only
    weight: float = 1.0
    extract: str | None = None  # generate: regex searched in the output; first matched group, else the match
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generate: stop strings
    path: str = ""


def load_task(path: str | Path) -> Task:
    """Read and check one task file; every problem is a one-line DarwinError naming file and line."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ScoreError(f"{p}: cannot read task file (no such regular file)")
        if p.stat().st_size > MAX_TASK_BYTES:
            raise ScoreError(f"{p}: task file is larger than {MAX_TASK_BYTES >> 20} MiB")
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ScoreError(f"{p}: task file is not UTF-8 text") from None
    except OSError as e:
        raise ScoreError(f"{p}: cannot read task file ({e.strerror})") from None
    opts: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoreError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ScoreError(f"{p}:{i}: expected a JSON object")
        if "task" in obj and not items and not opts:
            if not isinstance(obj["task"], dict):
                raise ScoreError(f'{p}:{i}: "task" must be an object of options')
            opts = obj["task"]
            unknown = set(opts) - OPTION_KEYS
            if unknown:
                raise ScoreError(f"{p}:{i}: unknown task option(s) {sorted(unknown)}; known: {sorted(OPTION_KEYS)}")
            _check_option_types(f"{p}:{i}", opts)
            continue
        items.append(obj)
    if not items:
        raise ScoreError(f"{p}: task file has no items")
    first = items[0]
    kind = opts.get("kind") or ("choice" if "choices" in first else "perplexity" if "text" in first else "generate")
    if kind not in KINDS:
        raise ScoreError(f"{p}: unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    metric = opts.get("metric", METRICS[kind][0])
    if metric not in METRICS[kind]:
        raise ScoreError(f"{p}: metric {metric!r} does not apply to {kind} tasks; use one of {', '.join(METRICS[kind])}")
    if opts.get("limit"):
        items = items[: int(opts["limit"])]
    for n, item in enumerate(items):
        _check_item(p, kind, n, item)
    weight = float(opts.get("weight", 1.0))
    if not (math.isfinite(weight) and weight >= 0):  # JSON's 1e999 is inf: the fitness would be nan
        raise ScoreError(f"{p}: weight must be a finite number >= 0, got {show(opts.get('weight'))}")
    stop = opts.get("stop", ["\n"])
    if isinstance(stop, str):
        stop = [stop]
    extract = opts.get("extract")
    if extract is not None:
        try:
            re.compile(extract)
        except re.error as e:
            raise ScoreError(f"{p}: extract is not a valid regex ({e})") from None
    return Task(
        name=str(opts.get("name", p.name.removesuffix(".jsonl").removesuffix(".json"))),
        kind=kind,
        items=items,
        metric=metric,
        fewshot=str(opts.get("fewshot", "")),
        max_tokens=int(opts.get("max_tokens", 32)),
        weight=weight,
        extract=extract,
        stop=list(stop),
        path=str(p),
    )


# Each option's JSON type: a wrong one (a weight "heavy", max_tokens [3]) is one line, not a traceback.
_OPTION_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "kind": ((str,), "a string"),
    "metric": ((str,), "a string"),
    "fewshot": ((str,), "a string"),
    "extract": ((str,), "a string"),
    "max_tokens": ((int,), "a positive integer"),
    "limit": ((int,), "a positive integer"),
    "weight": ((int, float), "a number"),
    "stop": ((str, list), "a string or a list of strings"),
}


def _check_option_types(where: str, opts: dict[str, Any]) -> None:
    for key, (types, what) in _OPTION_TYPES.items():
        if key not in opts or (key == "extract" and opts[key] is None):
            continue
        v = opts[key]
        ok = isinstance(v, types) and not isinstance(v, bool)
        if ok and key in ("max_tokens", "limit"):
            ok = v > 0
        if ok and key == "stop" and isinstance(v, list):
            ok = all(isinstance(s, str) for s in v)
        if not ok:
            raise ScoreError(f"{where}: task option {key} must be {what}, got {show(v)}")


def _check_item(p: Path, kind: str, n: int, item: dict[str, Any]) -> None:
    where = f"{p}: item {n}"
    if kind == "choice":
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("choices"), list):
            raise ScoreError(f'{where}: a choice item needs "prompt" (string) and "choices" (list)')
        if not item["choices"] or not all(isinstance(c, str) and c for c in item["choices"]):
            raise ScoreError(f"{where}: choices must be non-empty strings")
        a = item.get("answer")
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < len(item["choices"]):
            raise ScoreError(f'{where}: "answer" must be the index of the right choice (0..{len(item["choices"]) - 1})')
    elif kind == "generate":
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("answer"), (str, int, float)):
            raise ScoreError(f'{where}: a generate item needs "prompt" and "answer"')
    elif not isinstance(item.get("text"), str) or not item["text"]:
        raise ScoreError(f'{where}: a perplexity item needs a non-empty "text"')


def normalize(s: str) -> str:
    """Exact-match normalisation: lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(output: str, pattern: str | None) -> str:
    """The part of a generation that is compared: the regex's first group (or whole match) if given."""
    if not pattern:
        return output
    m = re.search(pattern, output)
    if not m:
        return ""
    groups = [g for g in m.groups() if g is not None]
    return groups[0] if groups else m.group(0)


def split_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context+continuation and the index where the continuation's tokens start.

    The whole string is tokenized at once (as lm-evaluation-harness does) so that the continuation is
    tokenized the way the model would see it in running text; the context's own tokenization marks
    the split. If merging across the boundary changed the context's tokens, fall back to tokenizing
    the two parts separately.
    """
    ctx = tokenizer(context)["input_ids"] if context else []
    whole = tokenizer(context + continuation)["input_ids"]
    if ctx and whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole, len(ctx)
    if not ctx:
        return whole, 1 if len(whole) > 1 else 0
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx + cont, len(ctx)


def run_task(backend: Backend, tokenizer: Any, task: Task) -> tuple[float, list[dict[str, Any]]]:
    """Score one task; return its metric and one details record per item."""
    if task.kind == "choice":
        return _run_choice(backend, tokenizer, task)
    if task.kind == "generate":
        return _run_generate(backend, tokenizer, task)
    return _run_perplexity(backend, tokenizer, task)


def _run_choice(backend: Backend, tokenizer: Any, task: Task) -> tuple[float, list[dict[str, Any]]]:
    seqs: list[list[int]] = []
    starts: list[int] = []
    owners: list[int] = []
    for n, item in enumerate(task.items):
        for choice in item["choices"]:
            ids, start = split_tokens(tokenizer, task.fewshot + item["prompt"], choice)
            if start < 1:
                raise ScoreError(f"{task.path}: item {n}: prompt and choice tokenize to one token; nothing to score")
            seqs.append(ids)
            starts.append(start)
            owners.append(n)
    all_lps = backend.token_logprobs(seqs)
    sums: list[list[float]] = [[] for _ in task.items]
    means: list[list[float]] = [[] for _ in task.items]
    for lps, start, n in zip(all_lps, starts, owners, strict=True):
        cont = lps[start - 1 :]  # lps[i-1] is the log-probability of token i
        sums[n].append(float(sum(cont)))
        means[n].append(float(sum(cont) / len(cont)))
    details = []
    correct = 0
    for n, item in enumerate(task.items):
        scores = sums[n] if task.metric == "acc" else means[n]
        pick = max(range(len(scores)), key=scores.__getitem__)
        correct += pick == item["answer"]
        details.append({"task": task.name, "index": n, "choice_logprobs": sums[n], "pick": pick, "correct": pick == item["answer"]})
    return correct / len(task.items), details


def _run_generate(backend: Backend, tokenizer: Any, task: Task) -> tuple[float, list[dict[str, Any]]]:
    seqs = [tokenizer(task.fewshot + item["prompt"])["input_ids"] for item in task.items]
    outputs = backend.generate(seqs, task.max_tokens, task.stop)
    details = []
    correct = 0
    for n, (item, out) in enumerate(zip(task.items, outputs, strict=True)):
        ok = normalize(extract_answer(out, task.extract)) == normalize(str(item["answer"]))
        correct += ok
        details.append({"task": task.name, "index": n, "output": out, "correct": ok})
    return correct / len(task.items), details


def _run_perplexity(backend: Backend, tokenizer: Any, task: Task) -> tuple[float, list[dict[str, Any]]]:
    seqs, starts = [], []
    for item in task.items:
        ids, start = split_tokens(tokenizer, task.fewshot, item["text"])
        seqs.append(ids)
        starts.append(start)
    all_lps = backend.token_logprobs(seqs)
    details = []
    total_lp, total_tokens = 0.0, 0
    for n, (lps, start) in enumerate(zip(all_lps, starts, strict=True)):
        scored = lps[max(start, 1) - 1 :]
        lp = float(sum(scored))
        total_lp += lp
        total_tokens += len(scored)
        details.append({"task": task.name, "index": n, "logprob": lp, "tokens": len(scored)})
    if total_tokens == 0:
        raise ScoreError(f"{task.path}: no scorable tokens (every text is a single token)")
    nll = -total_lp / total_tokens  # token-weighted mean, so long texts count for their length
    return (math.exp(-nll) if task.metric == "inv_perplexity" else -nll), details


def fitness(results: dict[str, dict[str, Any]], tasks: list[Task]) -> float:
    """Weighted mean of the task scores (weights from the task options; all zero -> plain mean)."""
    weights = {t.name: t.weight for t in tasks}
    total = sum(weights[name] for name in results)
    if total == 0:
        return sum(r["score"] for r in results.values()) / len(results)
    return sum(weights[name] * r["score"] for name, r in results.items()) / total
