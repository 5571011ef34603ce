# Two commands set everything up on a fresh machine (see README.md):
#   make demo   -> creates .venv if missing, installs certkit, runs the digits demo
#   make test   -> creates .venv if missing, installs certkit + test tools, runs the whole test suite
#   make docs   -> installs the docs tools (the `docs` extra), builds docs/ + the API reference into site/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.certkit-installed
DOCS_STAMP := $(VENV)/.certkit-docs-installed

.PHONY: install demo test docs bench lint clean-runs

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/certkit demo --out runs/demo

# pytest exits 5 when it collects no test: make treats that as a failure, so "no tests" never passes.
test: $(STAMP)
	$(PY) -m pytest -q

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	@touch $(DOCS_STAMP)

# mkdocs.yml sets strict: a warning (broken link, unresolved reference, missing module) fails the build.
docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/bench_bounds.py
	$(PY) benchmarks/bench_smoothing.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-runs:
	rm -rf runs
