# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/saga-es: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/saga-es
	$(BIN)/saga-es demo

test: $(BIN)/saga-es
	$(BIN)/pytest

lint: $(BIN)/saga-es
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/saga-es
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/projections.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis saga-es-demo.db*
