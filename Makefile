# clipdex: `make demo` to see it work, `make test` to check it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-dev
# pip keeps its downloads beside the environment, not in $HOME (a fresh machine's `make test` leaves
# $HOME as it found it); set PIP_CACHE_DIR to share a cache of your own between checkouts
PIP_CACHE_DIR ?= $(abspath $(VENV))/pip-cache
export PIP_CACHE_DIR

.PHONY: install install-dev system-deps typecheck test test-fast demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(STAMP): $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(STAMP)

# Debian's chromium (browser tests) and postgresql (catalog tests), when missing
system-deps:
	@bash .ci/system-deps

# mypy reads the package as it is installed (`clipdex.*`): a tree of links maps the folders
TYPECHECK_TREE := build/typecheck/clipdex
typecheck: $(STAMP)
	@mkdir -p $(TYPECHECK_TREE)
	@ln -sfn ../../../search/package_root/__init__.py $(TYPECHECK_TREE)/__init__.py
	@for part in search indexer cli; do ln -sfn ../../../$$part $(TYPECHECK_TREE)/$$part; done
	MYPYPATH=build/typecheck $(PY) -m mypy -p clipdex

test: $(STAMP) system-deps typecheck
	$(PY) -m pytest -q

test-fast: $(STAMP) system-deps
	$(PY) -m pytest -q -m "not slow"

demo: $(VENV)/.installed
	bash data/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf demo .bench build *.egg-info
