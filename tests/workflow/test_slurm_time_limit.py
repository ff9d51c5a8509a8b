"""A fine-tune killed by SLURM's time limit resumes on its retry, and ends as if never killed.

On the one-node test cluster (tests/slurm/start-cluster.sh; skipped without one, a failure with
SECURETUNE_REQUIRE_SLURM=1 as in CI). The fine-tune of the tiny workflow's vanilla arm runs a
few thousand steps (minutes on a CPU) with a checkpoint every 100, under a time limit of
1 minute x the attempt (SLURM's smallest). The first attempt is killed at its limit; Snakemake
resubmits it with more time and `--resume matching` continues from the checkpoint the killed
attempt left. The same fine-tune run locally without a limit, afterwards (side by side, two
jobs of two threads on two cores would slow each other several times over), is the reference:
the weights and the per-step log must be equal bit for bit (same code, seeds and threads).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from .helpers import REPO, copy_workflow, snakemake
from .test_slurm import cluster  # noqa: F401 - skips or fails without a cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TARGET = "results/general/finetune/vanilla/loss.parquet"
MODEL = "results/general/finetune/vanilla/model/model.safetensors"
# About 2 minutes of training on a 2-core CPU alone: the first attempt is killed part way.
OVERLAY = {"finetune": {"steps": 2500, "checkpoint_every": 100}}


def time_limited_profile(workdir: Path) -> Path:
    """The SLURM test profile, the fine-tune limited to 1 minute per attempt, 3 retries."""
    profile = yaml.safe_load((REPO / "tests" / "slurm" / "profile" / "config.yaml").read_text())
    profile["retries"] = 3
    profile.setdefault("set-resources", {})["finetune"] = {"runtime": "1 * attempt"}
    folder = workdir / "time_limited_profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the SLURM run's folder, the local reference's folder)."""
    cluster_dir = copy_workflow(tmp_path_factory.mktemp("limited") / "repo", tiny_default=True)
    local_dir = copy_workflow(tmp_path_factory.mktemp("reference") / "repo", tiny_default=True)
    for workdir in (cluster_dir, local_dir):
        (workdir / "configs" / "long.yaml").write_text(yaml.safe_dump(OVERLAY))
    profile = time_limited_profile(cluster_dir)
    result = snakemake(
        cluster_dir, "--profile", str(profile), "--workflow-profile", "none",
        "--configfile", "configs/long.yaml", "--", TARGET, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    snakemake(local_dir, "--configfile", "configs/long.yaml", "--", TARGET)
    return cluster_dir, local_dir


def test_first_attempt_was_killed_by_its_time_limit(runs):
    """SLURM keeps its log of a failed job (and deletes a successful one's): the killed attempt."""
    logs = [p.read_text(errors="replace")
            for p in (runs[0] / "logs" / "slurm" / "rule_finetune").rglob("*.log")]  # fmt: skip
    assert any("DUE TO TIME LIMIT" in log for log in logs), "no attempt hit its time limit"


def test_retry_resumed_from_a_checkpoint_not_step_0(runs):
    log = (runs[0] / "logs" / "general" / "finetune" / "vanilla.log").read_text()
    resumed = [int(step) for step in re.findall(r"resumed from .* \(step (\d+)\)", log)]
    assert resumed and resumed[-1] >= 250, log[-3000:]


def test_resumed_run_equals_the_uninterrupted_one(runs):
    cluster_dir, local_dir = runs
    resumed, reference = load_file(cluster_dir / MODEL), load_file(local_dir / MODEL)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    pd.testing.assert_frame_equal(
        pd.read_parquet(cluster_dir / TARGET), pd.read_parquet(local_dir / TARGET)
    )
    # Checkpoints are removed once the model is saved.
    checkpoints = cluster_dir / "results" / "general" / "finetune" / "vanilla" / "model.checkpoints"
    assert not checkpoints.exists()
