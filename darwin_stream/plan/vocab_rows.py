"""mergekit's rule for the embedding and lm_head rows of the child's tokens (its embed.py), as runs.

For every input of a vocabulary tensor, each child token's row is that input's own row for the
token when it has one (and the token is not forced); otherwise the token's default row, the same
for every input that lacks it:
  - a token configured in `tokenizer.tokens`: zeros, a model's row for the token, or a model's row
    for another token (`kind: model_token`);
  - else, a token only one input has: that input's row; no input has it: zeros;
  - else, when the base is an input and has it: the base's row;
  - else: the mean of the rows of the inputs that have it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from darwin_stream.errors import PlanError
from darwin_stream.plan.types import RowRun
from darwin_stream.tokenizer.vocab import ChildVocab

Term = tuple[str, str, int]  # (parent key, tensor, row)


@dataclass(frozen=True)
class TokenSource:
    """A `tokenizer.tokens` entry, resolved: kind zero | model | model_token."""

    kind: str
    model: str | None = None  # parent key
    row: int | None = None  # model_token: the row in `model`
    force: bool = False
    where: str = ""  # manifest path, for errors


@dataclass(frozen=True)
class Input:
    key: str  # parent key
    tensor: str
    rows: int  # rows stored in the parent


def _default(token: str, tid: int, src: TokenSource, inputs: Mapping[str, Input], vocab: ChildVocab,
             tensor: str) -> tuple[Term, ...]:
    if src.kind == "zero":
        return ()
    assert src.model is not None
    inp = inputs.get(src.model)
    if inp is None:
        raise PlanError(f"{src.where}: token {token!r} takes its row from {src.model}, which is not an input of {tensor}")
    row = src.row if src.kind == "model_token" else vocab.positions[src.model][tid]
    if row is None or row < 0:
        raise PlanError(f"{src.where}: token {token!r} is not in the vocabulary of {src.model}")
    if row >= inp.rows:
        raise PlanError(f"{src.where}: token id {row} is beyond the {inp.rows} rows of {inp.tensor} in {src.model}")
    return ((inp.key, inp.tensor, row),)


def default_rows(vocab: ChildVocab, inputs: Sequence[Input], base: str | None,
                 tokens: Mapping[str, TokenSource], tensor: str) -> dict[int, tuple[Term, ...]]:
    """child id -> the terms of its default row, for every token some input lacks or that is forced."""
    by_key = {i.key: i for i in inputs}
    at = [vocab.positions[i.key] for i in inputs]
    out: dict[int, tuple[Term, ...]] = {}
    for token, tid in vocab.vocab.items():
        src = tokens.get(token)
        present = [p[tid] >= 0 for p in at]
        if all(present) and not (src and src.force):
            continue
        n = sum(present)
        if src is None:
            if n == 1:
                i = inputs[present.index(True)]
                src = TokenSource("model", i.key)
            elif n == 0:
                src = TokenSource("zero")
            elif base in by_key and vocab.positions[base][tid] >= 0:
                src = TokenSource("model", base)
        if src is None:  # the mean over the inputs that have it, in input order
            out[tid] = tuple((i.key, i.tensor, p[tid]) for i, p in zip(inputs, at, strict=True) if p[tid] >= 0)
        else:
            out[tid] = _default(token, tid, src, by_key, vocab, tensor)
    return out


def input_runs(vocab: ChildVocab, inp: Input, defaults: Mapping[int, tuple[Term, ...]],
               forced: set[int], rows: int | None = None) -> tuple[RowRun, ...] | None:
    """One input's rows in child order, as runs; None when that is the input exactly as stored.

    `rows` above the vocabulary's size (tokenizer.pad_to_multiple_of) adds a run of padding rows,
    each the mean of the input's rows for the real tokens (mergekit's embed.py)."""
    runs: list[RowRun] = []
    at = vocab.positions[inp.key]
    for tid in range(vocab.size):
        own = at[tid]
        terms: tuple[Term, ...] = ((inp.key, inp.tensor, own),) if own >= 0 and tid not in forced else defaults.get(tid, ())
        if runs:
            last = runs[-1]
            if len(last.terms) == len(terms) and all(
                a[:2] == b[:2] and a[2] + last.count == b[2] for a, b in zip(last.terms, terms, strict=True)
            ):
                runs[-1] = RowRun(last.row, last.count + 1, last.terms)
                continue
        runs.append(RowRun(tid, 1, terms))
    if rows is not None and rows > vocab.size:
        runs.append(RowRun(vocab.size, rows - vocab.size, (), mean=True))
    if len(runs) == 1 and runs[0].terms == ((inp.key, inp.tensor, 0),) and runs[0].count == inp.rows:
        return None
    return tuple(runs)
