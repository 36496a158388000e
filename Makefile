# minisparse — every target bootstraps .venv first (idempotent: a second run installs nothing).
#   make book        build the Jupyter Book offline into book/_build/html
#   make test        everything CI checks: unit tests, chapters under nbval, pairing/export checks, strict book build
#   make notebooks   sync each chapters/NN_x.py into its .ipynb and execute it (commit both)
#   make export      regenerate minisparse/<mechanism>/ from the chapters' export cells
#   make lab         JupyterLab on the chapters
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
CHAPTERS := $(sort $(wildcard chapters/[0-9][0-9]_*.py))
NOTEBOOKS := $(CHAPTERS:.py=.ipynb)
JB := $(BIN)/jupyter-book build . --config book/_config.yml --toc book/_toc.yml --path-output book

.PHONY: help venv book book-strict test unit nbval check export sync-setup notebooks lab clean
help:
	@sed -n '2,7p' Makefile | sed 's/^# //'

venv: $(STAMP)
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing minisparse with its book and test extras"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" || { echo "make: installing $(TORCH) failed"; exit 1; }
	$(BIN)/python -m pip install --quiet "$(TRITON)" || { echo "make: installing $(TRITON) failed"; exit 1; }
	$(BIN)/python -m pip install --quiet -e ".[book,test]" || { echo "make: installing minisparse[book,test] failed"; exit 1; }
	touch $(STAMP)

book: $(STAMP)
	@echo "==> building the book (offline)"
	$(JB)
	@echo "book: $(abspath book/_build/html/index.html)"

book-strict: $(STAMP)
	@echo "==> building the book with warnings as errors"
	$(JB) --warningiserror --nitpick --keep-going

unit: $(STAMP)
	@echo "==> unit tests"
	$(BIN)/python -m pytest tests -q

nbval: $(STAMP)
	@echo "==> executing every chapter under nbval"
	$(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider $(NOTEBOOKS)

check: $(STAMP)
	@echo "==> chapters -> package export, .py <-> .ipynb pairing, setup cells"
	$(BIN)/python tools/chapters.py check

test: unit check nbval book-strict
	@echo "==> make test: all checks passed"

export: $(STAMP)
	$(BIN)/python tools/chapters.py export

sync-setup: $(STAMP)
	$(BIN)/python tools/chapters.py sync-setup

notebooks: $(STAMP) sync-setup export
	@echo "==> syncing and executing the chapters"
	for py in $(CHAPTERS); do \
	  echo "   $$py"; \
	  $(BIN)/jupytext --quiet --to ipynb --execute "$$py" || { echo "make: executing $$py failed"; exit 1; }; \
	done

lab: $(STAMP)
	$(BIN)/jupyter lab chapters/

clean:
	rm -rf book/_build .pytest_cache
