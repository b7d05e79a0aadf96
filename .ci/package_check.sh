#!/usr/bin/env bash
# make package-check: dist_train as a `pip install` user gets it. Builds the sdist and the wheel (offline: the venv's
# setuptools, no build isolation), checks what the sdist holds, installs the wheel into a fresh virtual environment
# outside the checkout (the pinned constraints, from uv's package cache), and from a directory outside the checkout runs
# what a new user runs first: --version, --help, `dist-train new`, a 2-process training of the new project and its
# prediction, the Python API. Every Python process there fails on any file of the repository it opens or lists (an
# audit hook in the venv's sitecustomize): a file missing from the package, a path of the repository read by a module,
# or an entry point that needs the checkout fails here, not for users.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.venv/bin
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dist_train-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
step() { echo "package-check: $* ($(( $(date +%s) - started )) s)"; }

# from a copy of the files git knows (tracked and new, not ignored): the build writes build/ and *.egg-info beside its
# sources, and must not need anything the repository ignores
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    "$BIN/python" -c "import os, sys; sys.stdout.write(''.join(f + '\0' for f in sys.stdin.read().split('\0') if os.path.isfile(f)))" |
    tar --null -T - -cf -) | tar xf - -C "$WORK/src"
"$BIN/python" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
wheel=$(ls "$WORK"/dist/*.whl)
sdist=$(ls "$WORK"/dist/*.tar.gz)
(cd "$ROOT" && "$BIN/python" - "$sdist" "$wheel") <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

sdist, wheel = sys.argv[1:]
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
templates = sorted(p.name for p in Path("dist_train/templates/project").iterdir() if p.is_file())
needed = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "dist_train/py.typed",
          *(f"dist_train/templates/project/{t}" for t in templates)}
missing = sorted(needed - names)
assert not missing, f"the sdist lacks {missing}"
files = zipfile.ZipFile(wheel).namelist()
assert {f"dist_train/templates/project/{t}" for t in templates} | {"dist_train/py.typed"} <= set(files), files
assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), "the wheel carries no LICENSE"
print(f"package-check: {Path(wheel).name}: {len(files)} files, {Path(wheel).stat().st_size / 1024:.0f} KiB; "
      f"{Path(sdist).name}: {len(names)} entries")
EOF
step "built and checked"

base=$("$BIN/python" -c 'import sys; print(sys._base_executable)')
if [ -x "$BIN/uv" ]; then  # (its cache holds what make install fetched: links, no downloads)
    "$BIN/uv" venv --quiet --python "$base" "$WORK/venv"
    "$BIN/uv" pip install --quiet --python "$WORK/venv/bin/python" -c "$ROOT/constraints.txt" "$wheel"
else
    "$base" -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" "$wheel"
fi
step "installed into a fresh venv"
site=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/sitecustomize.py" <<'EOF'
# package-check's guard: a file of the repository opened or listed by any process of this venv is an error
import os
import sys

_repo = os.environ.get("PACKAGE_CHECK_REPO")
if _repo:
    _repo = os.path.realpath(_repo)

    def _guard(event, args, _repo=_repo, _log=os.environ["PACKAGE_CHECK_LOG"]):
        if event not in ("open", "os.listdir", "os.scandir") or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if path == _repo or path.startswith(_repo + os.sep):
            with open(_log, "a") as log:
                log.write(f"{event} {path} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})\n")
            raise RuntimeError(f"package-check: {event} of {path}, a file of the repository")

    sys.addaudithook(_guard)
EOF

mkdir "$WORK/user"
cd "$WORK/user"
export PATH="$WORK/venv/bin:$PATH" PACKAGE_CHECK_REPO="$ROOT" PACKAGE_CHECK_LOG="$WORK/violations.log" OMP_NUM_THREADS=1
# (bytecode written by the first process that imports a module, read by the next: not compiled again in every one)
unset PYTHONPATH VIRTUAL_ENV PYTHONDONTWRITEBYTECODE
version=$(python -c "import dist_train; print(dist_train.__version__)")
dist-train --version | grep -q "^dist_train $version (" || { echo "dist-train --version does not say $version"; exit 1; }
python -c "import importlib.metadata as m, sys; v = m.version('dist_train'); sys.exit(v != '$version' and f'metadata {v} != $version')"
dist-train --help > /dev/null
dist-train new proj > new.log
launch="accelerate launch --config_file proj/accelerate_config.yaml --num_processes 2 -m dist_train"
$launch train --config proj/config.yaml train.epochs=1 > train.log 2>&1 || { tail -40 train.log; exit 1; }
grep -q "dist_train: 2 process(es)" train.log || { tail -40 train.log; exit 1; }
$launch predict --config proj/config.yaml --checkpoint runs/proj/checkpoints/best > predict.log 2>&1 || { tail -40 predict.log; exit 1; }
rows=$(($(wc -l < runs/proj/submission.csv) - 1))
[ "$rows" -eq "$(($(wc -l < proj/data/info.csv) - 1))" ] || { echo "the submission has $rows rows"; exit 1; }
python - "$WORK/venv" <<'EOF'
import sys

import dist_train

assert dist_train.__file__.startswith(sys.argv[1]), f"dist_train imported from {dist_train.__file__}"
dist_train.Trainer
EOF
step "the installed package trained on 2 processes and predicted $rows rows from $WORK/user"
if [ -s "$WORK/violations.log" ]; then
    echo "package-check: files of the repository were read:"; cat "$WORK/violations.log"; exit 1
fi
echo "package-check: passed in $(( $(date +%s) - started )) s"
