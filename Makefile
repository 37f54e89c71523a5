# The README's two commands: `make demo` and `make test`. Both set up .venv/ first
# (idempotent: the stamp file skips the install when pyproject/constraints are unchanged).
# The lmms extra (lmms-eval) is installed too so its end-to-end test runs instead of skipping.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saint-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,lmms]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saint demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
