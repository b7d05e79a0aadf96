"""The code's shape, read from the source: dist_train's modules import each other without a cycle (imports inside
functions included, so none can hide one), no function runs over 80 lines, and the loop's methods take few arguments."""
import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dist_train"
MAX_FUNCTION_LINES = 80


@cache
def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def imported(tree: ast.Module) -> set[str]:
    """The dist_train modules a module imports, wherever the import stands."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dist_train":
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dist_train."))
    return names


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert imported(ast.parse("def f():\n    from dist_train.tasks import x\nimport dist_train.data\nfrom dist_train import faults")) \
        == {"tasks", "data", "faults"}


def test_the_module_graph_has_no_cycle():
    graph = {name: imported(tree) - {name} for name, tree in modules().items()}
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_the_loop_does_not_know_debug():
    graph = {name: imported(tree) for name, tree in modules().items()}
    for module in ("trainer", "engine", "build"):
        assert "debug" not in graph[module]


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [f"{name}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for name, tree in modules().items()
            for f in functions(tree) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_loops_methods_take_at_most_three_arguments():
    run = next(node for node in ast.walk(modules()["engine"]) if isinstance(node, ast.ClassDef) and node.name == "Run")
    methods = [f for f in run.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"]
    assert {"train", "train_epoch", "micro_step", "optimizer_step", "after_step", "evaluate", "end_epoch"} <= {f.name for f in methods}
    wide = [f.name for f in methods if len(f.args.args) + len(f.args.kwonlyargs) - 1 > 3]
    assert not wide, wide


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_every_module_says_its_job_first(module):
    assert ast.get_docstring(modules()[module]), f"dist_train/{module}.py has no module docstring"
