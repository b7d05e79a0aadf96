"""The code's shape, read from the source: dist_train's packages import only those below them (docs/architecture.md),
its modules import each other without a cycle (imports inside functions included, so none can hide one), no module
runs over 450 lines nor function over 80, and the loop's methods take few arguments."""
import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dist_train"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
LAYERS = ("base", "job", "data", "models", "rundir", "loop", "commands")
"""From the bottom up: a module imports modules of its own layer and of those below (docs/architecture.md).
base: the top-level modules (config, errors, custom, compat) and the config package."""


def module_name(path: Path) -> str:
    """dist_train/loop/engine.py -> loop.engine; dist_train/data/__init__.py -> data; dist_train/errors.py -> errors."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))
            if "templates" not in path.parts and path.name != "__main__.py" and path != PACKAGE / "__init__.py"}


def imported(tree: ast.Module, known: set[str] | None = None) -> set[str]:
    """The dist_train modules a module imports (dotted, below dist_train), wherever the import stands: `from
    dist_train.loop import engine` is loop.engine; `from dist_train.config import Config` the config package."""
    known = known if known is not None else set(modules())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dist_train":
            base = node.module[len("dist_train."):] if "." in node.module else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                names.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            names.update(a.name[len("dist_train."):] for a in node.names if a.name.startswith("dist_train."))
    return names - {""}


def layer(module: str) -> str:
    top = module.split(".")[0]
    return top if top in LAYERS else "base"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module from a layer above its own, naming both files."""
    def path(module: str) -> str:
        where = module.replace(".", "/")
        return f"dist_train/{where}{'/__init__' if (PACKAGE / where).is_dir() else ''}.py"

    return [f"{path(module)} ({layer(module)}) imports {path(target)} ({layer(target)}), a layer above it"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module))]


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


def graph() -> dict[str, set[str]]:
    return {name: imported(tree) - {name} for name, tree in modules().items()}


def test_the_cycle_finder_and_the_layer_check_find_what_they_look_for():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    known = {"models.tasks", "data", "data.tables", "job.faults", "config", "loop.engine"}
    assert imported(ast.parse("def f():\n    from dist_train.models.tasks import x\nimport dist_train.data\n"
                              "from dist_train.job import faults\nfrom dist_train.config import Config"), known) \
        == {"models.tasks", "data", "job.faults", "config"}
    assert upward_imports({"data.tables": {"config", "job.faults"}, "job.faults": set()}) == []
    assert upward_imports({"data.tables": {"loop.engine"}}) == [
        "dist_train/data/tables.py (data) imports dist_train/loop/engine.py (loop), a layer above it"]


def test_the_module_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, f"import cycle: {' -> '.join(found)}"


def test_no_package_imports_one_above_it():
    assert not upward_imports(graph()), "\n".join(upward_imports(graph()))


def test_the_tree_shows_its_parts():
    """At most 12 modules at the top beside __init__/__main__, at least 4 subpackages, none over 450 lines."""
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 12 and len(packages) >= 4, (top, packages)
    assert {layer(p) for p in packages} - {"base"} == set(LAYERS) - {"base"}, "every layer is a package"
    sizes = {str(path): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}


def test_the_loop_does_not_know_debug():
    for module in ("loop.trainer", "loop.engine", "loop.build"):
        assert "commands.debug" not in graph()[module]


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [f"{name}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for name, tree in modules().items()
            for f in functions(tree) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_loops_methods_take_at_most_three_arguments():
    run = next(node for node in ast.walk(modules()["loop.engine"]) if isinstance(node, ast.ClassDef) and node.name == "Run")
    methods = [f for f in run.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"]
    assert {"train", "train_epoch", "micro_step", "optimizer_step", "after_step", "evaluate", "end_epoch"} <= {f.name for f in methods}
    wide = [f.name for f in methods if len(f.args.args) + len(f.args.kwonlyargs) - 1 > 3]
    assert not wide, wide


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_says_its_job_first(module):
    assert ast.get_docstring(modules()[module]), f"dist_train/{module} has no module docstring"


def test_the_import_paths_from_before_the_subpackages_still_import():
    """A user's model.file written against the flat layout keeps running: old module paths are the new modules
    (one object under both names), the old data/models/config modules' names come from their packages."""
    import importlib
    import subprocess
    import sys

    from dist_train import compat
    from dist_train.loop import engine
    from dist_train.rundir import checkpoint

    assert importlib.import_module("dist_train.checkpoint") is checkpoint
    assert importlib.import_module("dist_train.engine").Run is engine.Run
    assert importlib.import_module("dist_train.checkpoint").__spec__.name == "dist_train.rundir.checkpoint"
    for old, new in compat.MOVED.items():
        assert importlib.import_module(f"dist_train.{old}") is importlib.import_module(new), old
    from dist_train.config import Config, load_config  # noqa: F401
    from dist_train.data import Records, build_loader, materialize_digits  # noqa: F401
    from dist_train.models import build_model, read_weights  # noqa: F401
    with pytest.raises(ImportError, match="build_loaders"):
        exec("from dist_train.data import build_loaders")
    proc = subprocess.run([sys.executable, "-m", "dist_train.synthetic", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert proc.returncode == 0 and "masks" in proc.stdout, proc.stderr
