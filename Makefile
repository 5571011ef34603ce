# Two commands set everything up on a fresh machine (see README.md):
#   make demo   -> creates .venv if missing, installs certkit, runs the digits demo
#   make test   -> creates .venv if missing, installs certkit + test tools, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.certkit-installed

.PHONY: install demo test bench lint clean-runs

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

bench: $(STAMP)
	$(PY) benchmarks/bench_bounds.py
	$(PY) benchmarks/bench_smoothing.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-runs:
	rm -rf runs
