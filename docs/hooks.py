"""mkdocs hooks: the reference pages made from the code at build time, so that they cannot drift from it.

reference/config.md  every config key: its type (the allowed values of a choice), default and doc, read from the
                     dataclasses of dist_train/config (the docstring under each field, as the source writes it)
reference/cli.md     the --help of train.py, predict.py and each dist-train command, from their own parsers
reference/api.md     its builder table: the functions model.file / data.file / loss.file must define (custom.EXPECTED)
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (Python keeps none at run time: read from its source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def annotations_text(cls) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    return {node.target.id: ast.unparse(node.annotation) for node in tree.body[0].body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _type(annotation: str) -> str:
    """A field's type as the page says it: a choice as its values, a union with "or"."""
    node = ast.parse(annotation, mode="eval").body
    parts = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # a | b | c, read from the right
        parts.insert(0, node.right)
        node = node.left
    parts.insert(0, node)
    said = []
    for part in parts:
        if isinstance(part, ast.Subscript) and ast.unparse(part.value) == "Literal":
            values = part.slice.elts if isinstance(part.slice, ast.Tuple) else [part.slice]
            said.append("one of " + ", ".join(f"`{ast.literal_eval(v)}`" for v in values))
        else:
            said.append(f"`{ast.unparse(part)}`")
    return " or ".join(said)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value or '""'


def _nested(annotation) -> type | None:
    """The dataclass a field holds (itself, in a list, or as one member of a union), if any."""
    for arg in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(arg):
            return arg
        for inner in typing.get_args(arg):
            if dataclasses.is_dataclass(inner):
                return inner
    return None


def section_table(cls, prefix: str, sections: list) -> str:
    docs, texts, hints = field_docs(cls), annotations_text(cls), typing.get_type_hints(cls)
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        nested = _nested(hints[field.name])
        if nested is not None and nested not in [s[1] for s in sections]:
            sections.append((f"{prefix}{field.name}", nested))
        if dataclasses.is_dataclass(hints[field.name]):
            continue  # a section of its own
        rows.append(f"| `{prefix}{field.name}` | {_type(texts.get(field.name, ''))} | `{_cell(_value(_default(field)))}` | "
                    f"{_cell(docs.get(field.name, ''))} |")
    return "\n".join(rows)


def config_reference() -> str:
    from dist_train.config import Config

    out = ["# Config keys", "",
           "Every key of a run's config, generated from `dist_train/config/sections.py` at build time: its type (a choice "
           "lists its allowed values), its default and what it does. Set them in the YAML file or as `section.key=value` "
           "overrides on the command line; an unknown key is an error naming the nearest valid one.", ""]
    sections: list = [("", Config)]
    done = 0
    while done < len(sections):
        prefix, cls = sections[done]
        done += 1
        doc = inspect.cleandoc(cls.__doc__ or "") if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        table = section_table(cls, f"{prefix}." if prefix else "", sections)
        if cls.__name__ == "SplitConfig":  # data.train, data.val and data.test each take this mapping
            title, doc = "`data.train`, `data.val`, `data.test` as mappings", doc + " The keys below for `data.train`; " \
                "`data.val` and `data.test` take the same."
        else:
            title = f"`{prefix}`" if prefix else "Top level"
        out += [f"## {title}", "", doc, "", table, ""]
    return "\n".join(out)


def _help(run, prog: str, argv: list[str]) -> str:
    old = sys.argv[0]
    sys.argv[0] = prog
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            run(argv)
    finally:
        sys.argv[0] = old
    return buffer.getvalue().rstrip()


def cli_reference() -> str:
    from dist_train.commands import cli, scaffold, shards

    commands = [
        ("train.py", "Train (one process: `python train.py`; several: `accelerate launch ... train.py`).", cli.train_main, []),
        ("predict.py", "Predict a table into one submission CSV, sharded over the processes.", cli.predict_main, []),
        ("dist-train", "The project command: its sub-commands.", scaffold.main, []),
        ("dist-train new", "Write a new project (config, model, dataset, loss, a smoke test).", scaffold.main, ["new"]),
        ("dist-train export", "Export a checkpoint (or a cross-validation run as one ensemble) to ONNX, checked against PyTorch.",
         cli.export_main, []),
        ("dist-train soup", "Average the folds' weights of a cross-validation run into one model.", cli.soup_main, []),
        ("dist-train shards", "Write a split as a shard set, into a directory or an S3-compatible store.", shards.main, []),
    ]
    out = ["# Command lines", "", "The `--help` of each command, generated from its own parser at build time.", ""]
    for name, what, run, argv in commands:
        out += [f"## `{name}`", "", what, "", "```text", _help(run, name, [*argv, "--help"]), "```", ""]
    return "\n".join(out)


def builders_table() -> str:
    from dist_train.custom import EXPECTED

    keys = {"build_model": "model.file", "build_dataset": "data.file", "build_loss": "loss.file"}
    rows = ["| config key | the file defines |", "|---|---|"]
    rows += [f"| `{keys[name]}` | `{_cell(signature)}` |" for name, signature in EXPECTED.items()]
    return "\n".join(rows)


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, text in (("reference/config.md", config_reference()), ("reference/cli.md", cli_reference())):
        files.append(File.generated(config, path, content=text))
    return files


LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")


def blank_before_blocks(markdown: str) -> str:
    """A blank line before a list or a table that follows its paragraph directly: the pages are written as GitHub
    renders Markdown (which needs none), Python-Markdown would run them into the paragraph."""
    out, fenced, block = [], False, None
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        kind = None if fenced else "list" if LIST_ITEM.match(line) else "table" if line.startswith("|") else None
        if kind and block != kind and out and out[-1].strip() and not block:
            out.append("")
        if not line.strip():
            block = None
        elif kind:
            block = kind
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return blank_before_blocks(markdown.replace("<!-- builders -->", builders_table()))
