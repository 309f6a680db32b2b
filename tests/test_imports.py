"""Data flows down: no module of the package imports one that imports it back (lazily or not)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "darwin_stream"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _nodes(tree: ast.Module) -> list[ast.stmt]:
    """Every import statement, in function bodies too, except under `if TYPE_CHECKING:`.

    A function-local import does not break a circle, it only hides it (style.md): the two modules
    still depend on each other. Lazy imports of heavy or optional packages (vllm, transformers)
    are not darwin_stream modules and so are not seen here.
    """
    out: list[ast.stmt] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """darwin_stream modules this one imports, anywhere but under TYPE_CHECKING."""
    out: set[str] = set()
    me = _module(path)
    for node in _nodes(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in known]
            if len(names) < len(subs):
                names.append(node.module)  # a name defined in the module itself
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != me and not me.startswith(n + "."):
                out.add(n)
                # importing a.b.c runs a.b's __init__ too
                parent = n.rpartition(".")[0]
                while parent:
                    if parent in known and parent != me and not me.startswith(parent + "."):
                        out.add(parent)
                    parent = parent.rpartition(".")[0]
    return out


def _graph() -> dict[str, set[str]]:
    files = list(PACKAGE.rglob("*.py"))
    known = {_module(p) for p in files}
    return {_module(p): _imports(p, known) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _checked(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {k: {m for m in v if m != "darwin_stream"} for k, v in graph.items()}


def test_no_import_circles():
    cycle = _cycle(_checked(_graph()))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_plan_types_are_a_leaf():
    graph = _graph()
    leaves = {"darwin_stream.dtypes", "darwin_stream.errors"}
    assert {m for m in graph["darwin_stream.plan.types"] if m.startswith("darwin_stream.")} <= leaves
    for leaf in leaves:
        assert not {m for m in graph[leaf] if m.startswith("darwin_stream.")} - leaves


def test_sources_and_identity_do_not_import_the_store():
    """The knot the parent pool untied: store/ reads parents through sources.py, so neither sources.py
    nor identity.py may reach store/ (stores are opened through the pool's store opener)."""
    graph = _graph()
    for module in ("darwin_stream.sources", "darwin_stream.identity", "darwin_stream.transports"):
        assert not {m for m in graph[module] if m == "darwin_stream.store" or m.startswith("darwin_stream.store.")}, module
