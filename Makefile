# radtriage: `make demo` and `make test` work on a fresh machine with Python 3.11.
# CPU installs pin torch to the CPU build (constraints/cpu.txt); `make install GPU=1` on a CUDA
# host installs onnxruntime-gpu and the default (CUDA) torch instead.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
GPU ?=
ifeq ($(GPU),)
EXTRAS := cpu,dev,postgres
CONSTRAINTS := -c constraints/cpu.txt
else
EXTRAS := gpu,dev,postgres
CONSTRAINTS :=
endif
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint lint-docker bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

demo: install
	$(BIN)/radtriage demo

# Tests marked own_process connect the test process to a Ray cluster of their own. Ray's and
# Serve's driver state is process-wide and outlives ray.shutdown() (Serve's shared router keeps
# polling the first cluster), so each such file runs in a pytest process of its own (exit 5:
# none selected, e.g. a -k in PYTEST_ARGS).
OWN_PROCESS_FILES = $(shell grep -rl --include='test_*.py' 'mark.own_process' tests | sort)
test: install
	$(BIN)/python -m pytest -m "not own_process" $(PYTEST_ARGS)
	for f in $(OWN_PROCESS_FILES); do \
		$(BIN)/python -m pytest -m own_process $(PYTEST_ARGS) $$f || [ $$? -eq 5 ] || exit 1; \
	done

# Unit tests only: no Ray, Orthanc, Chromium, PostgreSQL or DICOM peers (tests/conftest.py fails
# an unmarked test that starts one) and none of the slow training/evaluation tests, for the
# edit-test loop.
test-fast: install
	$(BIN)/python -m pytest -n 2 -m "not integration and not own_process and not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) var .pytest_cache

# No Docker engine here and hadolint is not on PyPI: the compose file is linted with dclint
# (npm), and tests/test_packaging.py parses Dockerfile.gpu with the official parser in every
# `make test`. (dockerfilelint was tried: it rejects HEALTHCHECK --start-period, valid since 17.05.)
lint-docker: install
	npx --yes dclint docker-compose.gpu.yml
	$(BIN)/python -m pytest -q tests/test_packaging.py
