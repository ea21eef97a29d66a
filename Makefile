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

# the suite in TEST_WORKERS pytest-xdist processes: most end-to-end tests wait on processes,
# servers and timers, so 5 on 2 cores (2026-12-02, four runs within two hours: 4 left the cores
# idle 17 % of the run, 641 and 635 s; 5 kept them busy, 574 s; 6 added contention, 658 s and a
# timing-bound test failed); --dist worksteal lets an idle worker take queued tests from a busy one (the long
# end-to-end tests would otherwise queue behind each other at the end).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 5
test: install lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	$(BIN)/pytest -q tests/core tests/unit

# mutation testing of dispatcher/, schemas/, workers/ and the job-lifecycle code (runtime/finish,
# store, handbacks) against the fast tests ([tool.mutmut] in pyproject.toml). mutmut runs in
# build/mutation, a copy in the installed layout (tools/mutation_tree.py), so the mutated
# ratefleet.dispatcher/schemas/workers are the ones the tests import. Prints the survivors and
# the survival rate per area; fails when a survivor in dispatcher/core or the job lifecycle is
# not classified in tests/mutation_survivors.md. Results are cached in build/mutation/mutants.
# A subset: make mutants MUTANTS='ratefleet.dispatcher.core.*'; more parallel: MUTANT_CHILDREN=2
MUTATION_DIR := build/mutation
MUTANT_CHILDREN ?= 1
MUTANTS ?=
mutants: install
	$(BIN)/python tools/mutation_tree.py $(MUTATION_DIR)
	cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut run --max-children $(MUTANT_CHILDREN) $(MUTANTS)
	cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut results
	$(BIN)/python tests/mutation_summary.py $(MUTATION_DIR)/mutants

bench: install
	$(BIN)/python bench/limits.py

up: install
	$(BIN)/ratefleet up

clean:
	rm -rf $(VENV) .ratefleet .pytest_cache .hypothesis mutants build/mutation .typecheck .mypy_cache
