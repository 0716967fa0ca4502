# `make demo` and `make test` work on a fresh machine: both go through `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first: this machine holds a CPU wheel of 2.13.0, while a bare
# `torch` requirement would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo lint test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/dojo train quickstart

lint: setup
	$(BIN)/ruff check src tests benchmarks

# `test` leaves out the tests marked slow (pyproject.toml); `test-slow` runs only those; CI runs both.
test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
