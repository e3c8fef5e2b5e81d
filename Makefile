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

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	touch $@

demo: install
	$(BIN)/radtriage demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) var .pytest_cache
