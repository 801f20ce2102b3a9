# Two entry points: `make demo` (set up + run the main job on the embedded default) and
# `make test` (set up + run the test suite). Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# TORCH_INDEX: a wheel index for torch and torchvision, e.g. PyTorch's CPU-only builds
# (make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu), where the default wheels would bring
# several GB of CUDA libraries (README, "Installing").
TORCH_INDEX ?=
DEV_STAMP := $(VENV)/.installed-dev

$(STAMP): pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),grep -E '^torch' requirements.txt > $(VENV)/torch.txt && $(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX) -r $(VENV)/torch.txt)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# What the tests need beyond the demo: pytest and its workers, Selenium, the auth server, the
# Optuna dashboard and Ray (the tests of --executor ray).
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,dashboard,ray]"
	touch $(DEV_STAMP)

demo: setup
	$(BIN)/kdhar demo

# Workers: one per core (pytest-xdist); tests that share a server, Ray or torchrun carry an
# xdist_group mark and run on one worker (tests/conftest.py). WORKERS=0 runs in this process.
WORKERS ?= auto

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup --durations=20

bench: setup
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_kd_step.py

clean:
	rm -rf $(VENV) data/synthetic mlflow.db mlartifacts mlruns optuna.db runs
