# Two commands do all set-up on a fresh machine:
#   make quickstart   creates .venv, installs loraflow, builds the tiny model, runs the pipeline
#   make test         runs the test suite
# Both are idempotent: the install runs again only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# The CPU build on machines without a GPU: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
TINY_MODEL := .loraflow/models/tiny-llama
QUICKSTART_DATA := examples/quickstart/finance_sentiment.jsonl

.PHONY: install quickstart test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/loraflow tiny-model $(TINY_MODEL) --corpus $(QUICKSTART_DATA)
	$(BIN)/loraflow run configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check tasks flows tests benchmarks examples
