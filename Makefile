# make install: .venv with the pinned, tested versions; make test: the suite (WORKERS=N tests at a time, default 2);
# make demo: the digits run; make package-check: the built wheel, installed outside the checkout, used as a user would; make docs: the site into site/; make gpu-check OUT=DIR: the GPU check with the machine's own Python
# (bench/gpu_check.py), report in DIR.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAUNCH := $(BIN)/accelerate launch --config_file accelerate_config.yaml --num_processes 2
RUN_DIR := runs/digits
OUT ?= runs/gpu-check

.PHONY: install test test-fast demo gpu-check clean slurm-deps docs docs-serve package-check

install: $(STAMP)

$(STAMP): setup.py pyproject.toml dist_train/__init__.py constraints.txt tests/mlflow-server.txt tests/s3-server.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv installs the same pins as pip (constraints.txt) in about 20 s instead of about 3 min; pip where uv cannot be had
	@# --compile-bytecode: the .pyc files pip writes and uv does not by default; without them, where PYTHONDONTWRITEBYTECODE
	@# is set (as on this project's 2-core machines), every process compiles torch again: 11 s to import the training path, not 4.5
	{ $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt uv && \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev,deepspeed,export]'; } || \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,deepspeed,export]'
	@# DeepSpeed's CPU collectives JIT-build a C++ op (deepspeed_shm_comm, into ~/.cache/torch_extensions) when the first
	@# DeepSpeed job starts, and again whenever the venv's path changes (every fresh clone): 1-2.5 min of two compilers
	@# on this machine, paid here once instead of inside a timed test
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	  get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null 2>&1 || \
	  echo "warning: DeepSpeed's CPU op did not build here; the first DeepSpeed test builds it"
	@# an MLflow tracking server for the tests (tests/test_mlflow.py starts it): the full `mlflow`, in a venv of its own,
	@# as a server is another machine's (its pins, tests/mlflow-server.txt, need pyarrow < 26; the client is mlflow-skinny)
	test -x $(VENV)/mlflow-server/bin/python || $(PYTHON) -m venv $(VENV)/mlflow-server
	{ $(BIN)/uv pip install --quiet --python $(VENV)/mlflow-server/bin/python -r tests/mlflow-server.txt; } || \
	$(VENV)/mlflow-server/bin/python -m pip install --quiet --disable-pip-version-check -r tests/mlflow-server.txt
	@# an S3-compatible store for the tests (tests/test_shards.py starts it): moto's server mode, in a venv of its own
	test -x $(VENV)/s3-server/bin/python || $(PYTHON) -m venv $(VENV)/s3-server
	{ $(BIN)/uv pip install --quiet --python $(VENV)/s3-server/bin/python -r tests/s3-server.txt; } || \
	$(VENV)/s3-server/bin/python -m pip install --quiet --disable-pip-version-check -r tests/s3-server.txt
	touch $(STAMP)

# WORKERS tests at a time (pytest-xdist; tests/conftest.py keeps a module's shared runs on one worker); WORKERS=0: one.
# SHUFFLE=1: in a random order (pytest-randomly; the header prints the seed), SEED=N replays that order
WORKERS ?= 2
SHUFFLE ?=
SEED ?=
PYTEST := $(BIN)/python -m pytest tests -n $(WORKERS) --dist loadgroup $(if $(SHUFFLE)$(SEED),-p randomly) \
	$(if $(SEED),--randomly-seed=$(SEED))

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

demo: install
	$(LAUNCH) train.py --config configs/digits.yaml output_dir=$(RUN_DIR) --overwrite
	$(LAUNCH) predict.py --config configs/digits.yaml output_dir=$(RUN_DIR) --checkpoint $(RUN_DIR)/checkpoints/best
	@echo
	@echo "submission:       $(RUN_DIR)/submission.csv"
	@echo "TensorBoard logs: $(RUN_DIR)/tensorboard   ($(BIN)/tensorboard --logdir $(RUN_DIR)/tensorboard)"
	@echo "metrics:          $(RUN_DIR)/metrics.jsonl"

# The package as a pip user gets it (.ci/package_check.sh): sdist + wheel built offline, the wheel installed into a fresh
# venv outside the checkout, and a new project trained and predicted from there with nothing of the repository read
package-check: install
	bash .ci/package_check.sh

# The docs site (mkdocs.yml): built into site/ in strict mode (a broken link fails), or served at http://127.0.0.1:8000
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000

# No venv and no install: a lent GPU machine has its own Python and no network. DRY=1 forces the dry mode;
# WORK=DIR moves the logs, runs and benchmark JPEGs (default runs/gpu-check-work).
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(OUT) $(if $(WORK),--work $(WORK)) $(if $(DRY),--dry)

# Debian's Slurm + munge, for tests/test_slurm.py (a 2-node cluster emulated on this machine; needs root).
slurm-deps:
	command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null || \
	{ DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge; }; }

clean:
	rm -rf runs data
