# shmcast: set up, run the demo, run the tests.
#
#   make demo    create .venv, install shmcast, run `shmcast demo` (options: ARGS="...")
#   make test    create .venv, install shmcast with its test tools, make sure the spin model
#                checker is installed, run ruff and pytest
#   make test-vllm
#                create .venv-vllm (CPU torch, vLLM without its dependencies, shmcast with the
#                vllm extra), run vLLM's own queue tests against shmcast's MessageQueue, then
#                shmcast's compat tests (tests/compat) with torch and vLLM present
#
# On a fresh Debian/Ubuntu machine the missing system packages (a C compiler and the Python
# headers to build the extension, venv support, and spin for the tests) are installed with
# apt-get, through sudo unless make runs as root.

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VENV_VLLM ?= .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.installed
TORCH := torch==2.13.0
VLLM := vllm==0.33.0

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

.DEFAULT_GOAL := help
.PHONY: help demo test test-vllm lint format venv venv-vllm system-deps spin clean

help:
	@echo "make demo    set up .venv and run the demo (ARGS=\"--readers 6 --wait spin\" ...)"
	@echo "make test    set up .venv (and spin) and run ruff and the test suite"
	@echo "make test-vllm  set up .venv-vllm and run vLLM's queue tests against shmcast"
	@echo "make lint    ruff check and ruff format --check"
	@echo "make format  ruff format and ruff check --fix"
	@echo "make clean   remove .venv and build products"

demo: $(STAMP)
	$(VENV)/bin/shmcast demo $(ARGS)

test: $(STAMP) spin
	$(VENV)/bin/ruff check src tests tests_vllm examples
	$(PY) -m pytest $(ARGS)

# vLLM's own queue tests (from its source distribution, fetched at test time) against
# shmcast's MessageQueue, then shmcast's compat tests where torch and vLLM are installed.
test-vllm: $(VLLM_STAMP)
	$(VENV_VLLM)/bin/python tests_vllm/run.py
	$(VENV_VLLM)/bin/python -m pytest tests/compat tests/tools/test_bench.py::test_executor_loop_runs_vllms_shape $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tests_vllm examples
	$(VENV)/bin/ruff format --check src tests tests_vllm examples

format: $(STAMP)
	$(VENV)/bin/ruff format src tests tests_vllm examples
	$(VENV)/bin/ruff check --fix src tests tests_vllm examples

venv: $(STAMP)

# The virtual environment, with shmcast installed editable (the C extension is built in place)
# and the test extra.  Rebuilt when the packaging or the C source changes.
$(STAMP): pyproject.toml setup.py $(wildcard src/shmcast/_csrc/*.[ch])
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# The venv of `make test-vllm`.  torch is pinned in every step: 2.13.0 is a CPU build that pip
# finds locally, and any other version would pull gigabytes of CUDA packages.  vLLM is
# installed without its dependencies (its queue needs only the small packages listed); pip warns
# that vLLM wants another torch.  setuptools<81, setuptools-scm, setuptools-rust, wheel and
# jinja2 are what preparing vLLM's source distribution needs (tests_vllm/run.py downloads it).
venv-vllm: $(VLLM_STAMP)
$(VLLM_STAMP): pyproject.toml setup.py $(wildcard src/shmcast/_csrc/*.[ch])
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install --quiet $(TORCH)
	$(VENV_VLLM)/bin/python -m pip install --quiet $(TORCH) numpy packaging urllib3 regex \
	    pyzmq psutil multiprocess pytest pytest-timeout hypothesis \
	    'setuptools<81' setuptools-scm setuptools-rust wheel jinja2
	$(VENV_VLLM)/bin/python -m pip install --quiet --no-deps $(VLLM)
	$(VENV_VLLM)/bin/python -m pip install --quiet --no-deps -e '.[vllm]'
	$(VENV_VLLM)/bin/python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
	@touch $@

# What building needs from the system: venv support, a C compiler, the Python headers.
export HAVE_PYTHON_H := import os, sys, sysconfig; \
    sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	$(PYTHON) -c "$$HAVE_PYTHON_H" || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	    echo "installing system packages:$$missing"; \
	    command -v apt-get >/dev/null 2>&1 || { \
	        echo "error: missing$$missing and no apt-get here; install them by hand" >&2; exit 1; }; \
	    $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $$missing; \
	fi

# The test suite model-checks the protocol with spin (and compiles spin's verifier with gcc).
spin:
	@if ! command -v spin >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then \
	    echo "installing the spin model checker (Debian package spin) and gcc"; \
	    command -v apt-get >/dev/null 2>&1 || { \
	        echo "error: spin is missing and there is no apt-get here; install spin by hand" >&2; \
	        exit 1; }; \
	    $(APT_GET) update && $(APT_GET) install -y --no-install-recommends spin gcc; \
	fi

clean:
	rm -rf $(VENV) $(VENV_VLLM) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find src -name '*.so' -delete
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
