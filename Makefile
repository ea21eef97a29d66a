# ratefleet: `make demo` and `make test` each create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast bench up clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/ratefleet demo

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q tests/core tests/unit

bench: install
	$(BIN)/python bench/limits.py

up: install
	$(BIN)/ratefleet up

clean:
	rm -rf $(VENV) .ratefleet .pytest_cache .hypothesis
