# ratefleet: `make demo` and `make test` each create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install lint demo test test-fast mutants bench up clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/ratefleet demo

# style gates, run first by `make test`: ruff (lint and import order), mypy --strict over
# ratefleet.schemas and ratefleet.dispatcher.core ([tool.mypy] in pyproject.toml; mypy reads the
# installed layout from the symlink tree tools/package_tree.py builds); the layer contracts
# (.importlinter) run as tests/unit/test_layers.py, the typing gate also as tests/unit/test_typing.py
lint: install
	$(BIN)/ruff check .
	$(BIN)/python tools/package_tree.py .typecheck > /dev/null
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q tests/core tests/unit

# mutation testing of dispatcher/core against the fast tests ([tool.mutmut] in pyproject.toml);
# prints the surviving mutants and the counts (about 15 min on 2 cores; results cached in mutants/)
mutants: install
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut results
	$(BIN)/mutmut export-cicd-stats > /dev/null
	$(BIN)/python tests/mutation_summary.py

bench: install
	$(BIN)/python bench/limits.py

up: install
	$(BIN)/ratefleet up

clean:
	rm -rf $(VENV) .ratefleet .pytest_cache .hypothesis mutants .typecheck .mypy_cache
