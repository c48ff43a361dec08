# The one entry point for dev tasks. PYTHON may point at a venv's interpreter.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := .setup.stamp

.PHONY: setup serve test test-kernels test-gpu lint fmt typecheck check bench clean

$(STAMP): pyproject.toml
	@# torch first, pinned: an unpinned torch on a machine without one pulls a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
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
