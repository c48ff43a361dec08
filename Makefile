# The one entry point for dev tasks. Everything runs in a virtual environment: the active one
# ($VIRTUAL_ENV), else ./.venv, created on first use. VENV=dir picks another; PYTHON=python picks
# an interpreter directly (its environment is then yours to manage).
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
# A CPU-only machine without a local torch wheel: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (PyPI's default Linux torch is the multi-GB CUDA build). A GPU machine: .../whl/cu128 or yours.
TORCH_INDEX_URL ?=
STAMP := $(dir $(PYTHON)).lorasrv-setup.stamp

.PHONY: setup serve test test-kernels test-gpu lint fmt typecheck check bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(filter $(VENV)/bin/python,$(PYTHON))
	@# torch first, pinned: an unpinned torch on a machine without one pulls a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(PYTHON) -m lorasrv --host 127.0.0.1 --port 30000

test: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not gpu" -p no:cacheprovider

test-kernels: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q tests/kernels -m "not gpu" -p no:cacheprovider

test-gpu: $(STAMP)
	$(PYTHON) -m pytest -q -m gpu -p no:cacheprovider

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

fmt: $(STAMP)
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

typecheck: $(STAMP)
	$(PYTHON) -m mypy

check: lint typecheck test

clean:
	rm -f $(STAMP)
