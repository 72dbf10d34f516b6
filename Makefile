# Two commands do all the set-up on a fresh machine with python3 and pip:
#   make demo   - the main job: train the MNIST demo and draw its 2-D embedding
#   make test   - the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
# Both create and reuse the virtual environment $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA, `pip install torch==2.13.0` takes a CPU build (never a multi-GB CUDA
# build). With an NVIDIA driver present, the plain release is taken instead. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: all demo test bench bench-report lint gpu-check clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m fastdml.demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m bench.report

lint: $(VENV)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

gpu-check:
	bash bench/gpu_check.sh bench/out/gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks build *.egg-info
