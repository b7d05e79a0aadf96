"""The docs site (mkdocs.yml, docs/): it builds in strict mode (no broken link, page or reference), every YAML config
snippet in it and in the README passes the config loader's key checks, and every dist_train import path it names imports."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, run_env

from dist_train.config.parse import parse_keys
from dist_train.errors import ConfigError

PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md", ROOT / "launch" / "README.md"]


def test_the_site_builds_in_strict_mode_with_the_generated_reference(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                          env=run_env(NO_MKDOCS_2_WARNING="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "data.cache_dir" in config and "checkpoint.monitor" in config and "data.train.table" in config
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "usage: train.py" in cli and "--resume" in cli and "usage: dist-train soup" in cli
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "Trainer" in api and "build_dataset(cfg: DataConfig, split: str)" in api


def snippets() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)) for page in PAGES
            for text in [page.read_text()] for m in re.finditer(r"```ya?ml\n(.*?)```", text, re.S)]


def test_every_yaml_config_snippet_has_only_keys_the_config_knows():
    found = snippets()
    assert len(found) >= 3
    for where, text in found:
        try:
            parse_keys(yaml.safe_load(text))
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
    with pytest.raises(ConfigError, match="did you mean"):  # what a stale key in a page would meet
        parse_keys({"optim": {"lr": 1e-3, "weight_decai": 0.1}})


def test_every_dist_train_import_path_the_docs_name_imports():
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"\bdist_train(?:\.[A-Za-z_]\w*)+", page.read_text()))
    assert len(named) > 10
    missing = []
    for path in sorted(named):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, the rest attributes of it
            try:
                target = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute) and not (ROOT / "/".join(parts[:cut + 1])).with_suffix(".py").is_file():
                missing.append(path)
                break
            target = getattr(target, attribute, None)
    assert not missing, missing
