# Two entry points: `make demo` (set up + run the main job on the embedded default) and
# `make test` (set up + run the test suite). Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -e ".[dev,dashboard,ray]"  # ray: the tests of --executor ray
	touch $(STAMP)

demo: setup
	$(BIN)/kdhar demo

# Workers: one per core (pytest-xdist); tests that share a server, Ray or torchrun carry an
# xdist_group mark and run on one worker (tests/conftest.py). WORKERS=0 runs in this process.
WORKERS ?= auto

test: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup

bench: setup
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_kd_step.py

clean:
	rm -rf $(VENV) data/synthetic mlflow.db mlartifacts mlruns optuna.db runs
