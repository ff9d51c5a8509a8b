"""The tiny workflow end to end on a CUDA GPU: every model-loading stage computes there.

Skipped without a GPU (CI has none). On a GPU box, from a clone with the environment installed:

    pytest -m gpu tests/workflow/test_gpu.py

Each stage logs the hardware it computes on (`precision.detect`) and records it in the
provenance of its table, so the test reads both: a stage that ran on the CPU of a GPU node
(the failure this guards against) shows up as `cpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from securetune.io import read_provenance
from tests.workflow.helpers import copy_workflow

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The model-loading stages' tables: each records the hardware its job computed on.
MODEL_TABLES = [
    "results/robustness.parquet",
    "results/search/trace.parquet",
    "results/general/finetune/vanilla/loss.parquet",
    "results/math/finetune/ml_lr/loss.parquet",
    "results/general/generations/vanilla/advbench.parquet",
    "results/judge/guard/base.parquet",
    "results/math/ift_loss/vanilla.parquet",
]
# Their logs (the data and table stages never import torch, so they log the CPU).
MODEL_LOGS = [
    "extract_features.log", "score_module", "score_layer", "search_robust_modules.log",
    "finetune", "generate", "judge_guard", "heldout_ift_loss",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> Path:
    work = copy_workflow(tmp_path_factory.mktemp("gpu"), tiny_default=True)
    env = {k: v for k, v in os.environ.items() if k != "SECURETUNE_DEVICE"}
    cores = str(max(2, min(12, os.cpu_count() or 2)))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", cores],
        cwd=work, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return work


def test_the_workflow_completes_with_its_report(gpu_run):
    assert (gpu_run / "results" / "report" / "paper_tables.md").exists()
    assert (gpu_run / "results" / "math" / "report" / "report.md").exists()


def test_every_model_stage_logged_cuda(gpu_run):
    logs = [
        log
        for name in MODEL_LOGS
        for log in sorted(
            # logs/<stage>/... or, for a domain's jobs, logs/<domain>/<stage>/...
            (gpu_run / "logs").glob(f"**/{name}" + ("" if name.endswith(".log") else "/**/*.log"))
        )
    ]
    hardware = [
        line for log in logs for line in log.read_text().splitlines() if "hardware:" in line
    ]
    assert hardware, "no job logged its hardware"
    on_cpu = [line for line in hardware if "hardware: cpu" in line]
    assert not on_cpu, f"jobs computed on the CPU of a GPU machine: {on_cpu[:5]}"


@pytest.mark.parametrize("table", MODEL_TABLES)
def test_model_tables_record_cuda(gpu_run, table):
    path = gpu_run / table
    if not path.exists():
        pytest.skip(f"{table}: not produced by this config")
    assert read_provenance(path)["precision"]["device"] == "cuda", table
