# minisparse — every target bootstraps .venv first (idempotent: a second run installs nothing).
# `make help` lists the targets: the text after `## ` on a target's line.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
# torch 2.13.0 and triton 3.8.0 are local CPU wheels on the project's machines; override on others, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
# The newest triton release, for a second run of the unit tests in a venv of its own (`make unit-next`): its
# interpreter, which runs the kernels on a CPU, changes between releases (3.9 refused masks that 3.8 takes).
TRITON_NEXT ?= triton==3.9.0
NEXT := .venv-next
CHAPTERS := $(sort $(wildcard chapters/[0-9][0-9]_*.py))
NOTEBOOKS := $(CHAPTERS:.py=.ipynb)
JB := $(BIN)/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book

.PHONY: help venv book book-strict test lint unit unit-next nbval check export sync-setup notebooks lab clean
help: ## this list
	@echo "minisparse: make TARGET (all but help and clean create .venv first, once)"
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  make %-12s %s\n", $$1, $$2 }' $(firstword $(MAKEFILE_LIST))

venv: $(STAMP)
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing minisparse with its book and test extras"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) || { echo "make: installing $(TORCH) failed"; exit 1; }
	$(BIN)/python -m pip install --quiet $(TRITON) || { echo "make: installing $(TRITON) failed"; exit 1; }
	$(BIN)/python -m pip install --quiet -e ".[book,test]" || { echo "make: installing minisparse[book,test] failed"; exit 1; }
	touch $(STAMP)

book: $(STAMP) ## build the Jupyter Book offline into book/_build/html
	@echo "==> building the book (offline)"
	$(JB)
	@echo "book: $(abspath book/_build/html/index.html)"

book-strict: $(STAMP) ## the book with warnings as errors
	@echo "==> building the book with warnings as errors"
	$(JB) --warningiserror --nitpick --keep-going

lint: $(STAMP) ## ruff on the package, the tools, the benchmarks and the tests: unused or late imports, names undefined or defined twice (a test defined twice never runs)
	@echo "==> ruff: minisparse/, tools/, bench/ and tests/"
	$(BIN)/ruff check --quiet minisparse tools bench tests

# tests/test_chapters.py runs the checks of `tools/chapters.py check` (export, names, pairing, outputs, setup cells)
unit: $(STAMP) ## tests/ on the CPU, the chapters <-> package checks included
	@echo "==> unit tests, with the chapters -> package export, pairing, output and setup-cell checks"
	$(BIN)/python -m pytest tests -q

$(NEXT)/.installed: pyproject.toml
	@echo "==> creating $(NEXT): $(TORCH), $(TRITON_NEXT) and minisparse with its test extra"
	test -x $(NEXT)/bin/python || $(PYTHON) -m venv $(NEXT)
	$(NEXT)/bin/python -m pip install --quiet --upgrade pip
	$(NEXT)/bin/python -m pip install --quiet $(TORCH) || { echo "make: installing $(TORCH) failed"; exit 1; }
	$(NEXT)/bin/python -m pip install --quiet $(TRITON_NEXT) || { echo "make: installing $(TRITON_NEXT) failed"; exit 1; }
	$(NEXT)/bin/python -m pip install --quiet -e ".[test]" || { echo "make: installing minisparse[test] failed"; exit 1; }
	touch $@

unit-next: $(NEXT)/.installed ## tests/ again under the newest triton (TRITON_NEXT), whose interpreter runs the kernels on a CPU
	@echo "==> unit tests under $$($(NEXT)/bin/python -c 'import triton; print("triton", triton.__version__)')"
	$(NEXT)/bin/python -m pytest tests -q -p no:cacheprovider

nbval: $(STAMP) ## execute every chapter notebook under nbval
	@echo "==> executing every chapter under nbval"
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=600 -q -p no:cacheprovider $(NOTEBOOKS)

check: lint ## quick, before a commit: lint and `tools/chapters.py check` (`make test` runs both, once)
	@echo "==> chapters -> package export, names, .py <-> .ipynb pairing, notebook outputs, setup cells"
	$(BIN)/python tools/chapters.py check

test: lint unit unit-next nbval book-strict ## everything CI checks: lint, unit tests (also under the newest triton), nbval, strict book
	@echo "==> make test: all checks passed"

export: $(STAMP) ## regenerate minisparse/<mechanism>/ from the chapters' export cells
	$(BIN)/python tools/chapters.py export

sync-setup: $(STAMP) ## rewrite every chapter's setup cell and the book's URL from pyproject
	$(BIN)/python tools/chapters.py sync-setup

# MPLBACKEND unset: a non-inline backend (Agg) would save the notebooks without their figures. jupytext writes the
# .ipynb, `tools/chapters.py execute` runs it in place with nbclient, a cell at most 5 minutes, once more in a fresh
# kernel if one takes longer (its docstring says why not `jupyter nbconvert --execute`: a widget cell could leave it
# waiting on an idle kernel)
notebooks: $(STAMP) sync-setup export ## sync each chapters/NN_x.py into its .ipynb and execute it (commit both)
	@echo "==> syncing and executing the chapters"
	for py in $(CHAPTERS); do \
	  echo "   $$py"; \
	  $(BIN)/jupytext --quiet --to ipynb "$$py" && \
	  env -u MPLBACKEND $(BIN)/python tools/chapters.py execute "$${py%.py}.ipynb" \
	    || { echo "make: executing $$py failed"; exit 1; }; \
	done

lab: $(STAMP) ## JupyterLab on the chapters
	$(BIN)/jupyter lab chapters/

clean: ## remove the built book and pytest's cache
	rm -rf book/_build .pytest_cache
