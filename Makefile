# Everything installs itself: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= ortmux-data
SERVE_ARGS ?=

.PHONY: install serve test lint format protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ortmux serve --data-dir $(DATA_DIR) $(SERVE_ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

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

# Each script prints a table; figures in README come from these commands.
bench: $(BENCH_STAMP)
	$(PY) bench/session_creation.py
	$(PY) bench/memory.py
	$(PY) bench/latency.py
	$(PY) bench/adapters.py
	$(PY) bench/batching.py
	$(PY) bench/streaming.py

protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .ruff_cache build *.egg-info
