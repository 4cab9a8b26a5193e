# Everything installs itself: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= ortmux-data
SERVE_ARGS ?=

# Generated code comes from a pinned protoc in a venv of its own (see protos/generate.py).
PROTOC_VENV ?= .venv-protoc
PROTOC_TOOLS := 'grpcio-tools==1.72.2' 'googleapis-common-protos>=1.66'
PROTOC_STAMP := $(PROTOC_VENV)/.installed

.PHONY: install serve test lint format protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,test]'
	touch $(STAMP)

$(PROTOC_STAMP): Makefile
	$(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/python -m pip install --quiet $(PROTOC_TOOLS)
	touch $(PROTOC_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ortmux serve --data-dir $(DATA_DIR) $(SERVE_ARGS)

test: $(STAMP) $(PROTOC_STAMP)
	$(PY) -m ruff check .
	ORTMUX_PROTOC_PYTHON=$(PROTOC_VENV)/bin/python $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[worker,bench]'
	touch $(BENCH_STAMP)

# Each script prints a table; the figures in docs/benchmarks.md come from these commands.
bench: $(BENCH_STAMP)
	$(PY) bench/session_creation.py
	$(PY) bench/memory.py
	$(PY) bench/latency.py
	$(PY) bench/adapters.py
	$(PY) bench/batching.py
	$(PY) bench/streaming.py
	$(PY) bench/served.py
	$(PY) bench/exports.py
	$(PY) bench/quantized.py --rounds 5

protos: $(PROTOC_STAMP)
	$(PROTOC_VENV)/bin/python protos/generate.py

clean:
	rm -rf $(VENV) $(PROTOC_VENV) $(DATA_DIR) .pytest_cache .ruff_cache build *.egg-info
