# One-command set-up: `make run` (the main job) and `make test` (the suite) each create the
# virtualenv with the pinned stack first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# torchattacks is a benchmark/test reference only; its declared deps (torchvision, old requests) break the stack
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $@

run: setup
	$(BIN)/gradworks run data_diet

test: setup
	$(BIN)/pytest

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
