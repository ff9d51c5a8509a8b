"""A fine-tune that runs out of SLURM time resumes on its retry, and ends as if never stopped.

On the one-node test cluster (tests/slurm/start-cluster.sh; skipped without one, a failure with
SECURETUNE_REQUIRE_SLURM=1 as in CI). The fine-tune of the tiny workflow's vanilla arm runs a
few thousand steps with a checkpoint every 100, under a time limit of 1 minute x the attempt
(SLURM's smallest). How many steps is measured on the machine first: CPUs differ twofold and
more, and a fixed count that takes 2 minutes on one finished inside the first attempt's limit
(and SLURM's grace) on another. Two runs of Snakemake in one folder, one fine-tune:
1. killed: with finetune.stop_before_time_limit false (and checkpoint_keep_previous true, so the
   kill cannot catch the only checkpoint mid-write) and no retry, the first attempt is killed at
   its limit;
2. stopped: with the defaults, the next attempt resumes from the checkpoint the killed one left
   (`--resume matching`: neither setting is in the checkpoint's fingerprint), stops itself
   shortly before its limit with a checkpoint and exit code 75, and each retry, with more time,
   resumes from the step the attempt before stopped at, until one finishes.
One chain rather than two fine-tunes of their own: the training is the test's cost, and a
killed attempt and a stopped one show each way of resuming at that cost once.
The same fine-tune run locally without a limit, afterwards (side by side, two jobs of two
threads on two cores would slow each other several times over), is the reference: the weights
and the per-step log must be equal bit for bit (same code, seeds and threads).
"""

from __future__ import annotations

import math
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
# Seconds of training the chain is sized to: the first attempt (60 s, killed up to ~30 s late by
# SLURM's periodic check, ~15 s of it start-up) cannot finish, the second (120 s) stops itself
# with work left, and a third or fourth (180 s, 240 s; 3 retries) finishes.
TRAINING_S = 180
CALIBRATION_STEPS = 300
TRAINED = re.compile(r"trained steps 0\.\.(\d+) in ([\d.]+) s")
KILLED = {"finetune": {"stop_before_time_limit": False, "checkpoint_keep_previous": True}}
STOPPED = re.compile(r"stopping before the time limit after step (\d+) \(time left (\d+) s\)")
RESUMED = re.compile(r"resumed from .* \(step (\d+)\)")
CHECKPOINT = re.compile(r"checkpoint after step (\d+)")


def time_limited_profile(workdir: Path) -> Path:
    """The SLURM test profile, the fine-tune limited to 1 minute per attempt, 3 retries."""
    profile = yaml.safe_load((REPO / "tests" / "slurm" / "profile" / "config.yaml").read_text())
    profile["retries"] = 3
    profile.setdefault("set-resources", {})["finetune"] = {"runtime": "1 * attempt"}
    folder = workdir / "time_limited_profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def failed_attempts(workdir: Path) -> list[str]:
    """SLURM's logs of the fine-tune's failed attempts, first first (SLURM keeps a failed job's
    log and deletes a successful one's; they are named by job id)."""
    logs = (workdir / "logs" / "slurm" / "rule_finetune").rglob("*.log")
    return [p.read_text(errors="replace") for p in sorted(logs, key=lambda p: int(p.stem))]


def last_attempt(workdir: Path) -> str:
    """The trainer's log of the attempt that finished (each attempt writes it anew)."""
    return (workdir / "logs" / "general" / "finetune" / "vanilla.log").read_text()


def steps_in(pattern: re.Pattern, log: str) -> list[int]:
    return [int(match.group(1)) for match in pattern.finditer(log)]


def long_overlay(steps: int) -> dict:
    return {"finetune": {"steps": steps, "checkpoint_every": 100}}


def steps_for(seconds: float, local_dir: Path) -> int:
    """How many steps of the fine-tune take `seconds` on this machine, from a short local run
    of it (checkpoints included), rounded up to a checkpoint."""
    (local_dir / "configs" / "long.yaml").write_text(
        yaml.safe_dump(long_overlay(CALIBRATION_STEPS))
    )
    snakemake(local_dir, "--configfile", "configs/long.yaml", "--", TARGET)
    steps, took = TRAINED.findall(last_attempt(local_dir))[-1]
    per_step = float(took) / int(steps)
    return max(1000, 100 * math.ceil(seconds / per_step / 100))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the SLURM runs' folder, the local reference's folder)."""
    cluster_dir = copy_workflow(tmp_path_factory.mktemp("limited") / "repo", tiny_default=True)
    local_dir = copy_workflow(tmp_path_factory.mktemp("reference") / "repo", tiny_default=True)
    overlay = long_overlay(steps_for(TRAINING_S, local_dir))
    for workdir in (cluster_dir, local_dir):
        (workdir / "configs" / "long.yaml").write_text(yaml.safe_dump(overlay))
    (cluster_dir / "configs" / "killed.yaml").write_text(yaml.safe_dump(KILLED))
    profile = time_limited_profile(cluster_dir)
    on_slurm = ("--profile", str(profile), "--workflow-profile", "none")
    killed = snakemake(
        cluster_dir, *on_slurm, "--retries", "0",
        "--configfile", "configs/long.yaml", "configs/killed.yaml", "--", TARGET, check=False,
    )  # fmt: skip
    assert killed.returncode != 0, f"{overlay} finished within its first minute"
    stopped = snakemake(
        cluster_dir, *on_slurm, "--configfile", "configs/long.yaml", "--", TARGET, check=False
    )
    assert stopped.returncode == 0, (stopped.stdout + stopped.stderr)[-6000:]
    # The calibration's arm is replaced: its steps differ, so it reruns (from step 0: its
    # checkpoints were removed with its model saved).
    snakemake(local_dir, "--configfile", "configs/long.yaml", "--", TARGET)
    return cluster_dir, local_dir


def test_first_attempt_was_killed_by_its_time_limit(runs):
    attempts = failed_attempts(runs[0])
    assert attempts and "DUE TO TIME LIMIT" in attempts[0], "the first attempt was not killed"
    assert not STOPPED.search(attempts[0])


def test_next_attempt_resumed_from_the_killed_ones_checkpoint_not_step_0(runs):
    killed, resuming = failed_attempts(runs[0])[:2]
    saved = steps_in(CHECKPOINT, killed)
    assert saved and steps_in(RESUMED, resuming) == [saved[-1]], resuming[-3000:]


def test_later_attempts_stopped_themselves_before_their_time_limit(runs):
    later = failed_attempts(runs[0])[1:]
    assert later, "no attempt after the killed one stopped itself"
    for log in later:
        assert "DUE TO TIME LIMIT" not in log
        assert STOPPED.search(log) and "exit status 75" in log, log[-3000:]


def test_each_retry_resumed_from_the_step_the_attempt_before_stopped_at(runs):
    later = failed_attempts(runs[0])[1:]
    stops = [steps_in(STOPPED, log)[0] for log in later]
    resumed = [steps_in(RESUMED, log)[0] for log in [*later[1:], last_attempt(runs[0])]]
    assert resumed == stops, (stops, resumed)


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


def test_switching_checkpoint_settings_reruns_nothing(runs):
    """They change no result: neither in the arm's params nor in its checkpoint fingerprint."""
    local_dir = runs[1]
    (local_dir / "configs" / "killed.yaml").write_text(yaml.safe_dump(KILLED))
    plan = snakemake(
        local_dir, "-n", "--configfile", "configs/long.yaml", "configs/killed.yaml", "--", TARGET
    )
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-3000:]
