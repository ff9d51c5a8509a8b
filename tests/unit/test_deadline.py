"""The stop before a SLURM job's time limit: squeue's durations, the job's time left, and the
decision after each step, on an injected clock."""

from __future__ import annotations

import math
import subprocess

import pytest

from securetune.finetune.deadline import (
    FLOOR_S,
    SAFETY,
    Deadline,
    TimeLimit,
    checkpoint_estimate_s,
    job_time_left,
    parse_slurm_duration,
    slurm_time_left,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:00", 0.0),
        ("1:55", 115.0),
        ("59:59", 3599.0),
        ("1:02:03", 3723.0),
        ("23:59:59", 86399.0),
        ("2-01:02:03", 2 * 86400 + 3723.0),
        ("1-00:00:00\n", 86400.0),
        ("UNLIMITED", None),
        ("NOT_SET", None),
        ("INFINITE", None),
    ],
)
def test_squeue_durations(text, seconds):
    assert parse_slurm_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "12", "1-02:03", "1:2:3:4", "a:bc", "-1:00", "INVALID"])
def test_other_text_is_not_a_duration(text):
    with pytest.raises(ValueError, match="not a SLURM duration"):
        parse_slurm_duration(text)


class Squeue:
    """squeue's answer, recorded calls."""

    def __init__(self, stdout: str = "", fail: Exception | None = None) -> None:
        self.stdout, self.fail, self.calls = stdout, fail, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        if self.fail is not None:
            raise self.fail
        return subprocess.CompletedProcess(cmd, 0, self.stdout, "")


def test_time_left_asks_squeue_for_the_job():
    squeue = Squeue("  4:10\n")
    assert slurm_time_left("42", run=squeue) == 250.0
    assert squeue.calls == [["squeue", "-h", "-j", "42", "-o", "%L"]]


@pytest.mark.parametrize(
    "squeue",
    [
        Squeue(fail=FileNotFoundError("squeue")),
        Squeue(fail=subprocess.CalledProcessError(1, "squeue")),
        Squeue(fail=subprocess.TimeoutExpired("squeue", 60)),
        Squeue(""),
        Squeue("INVALID"),
        Squeue("UNLIMITED"),
    ],
    ids=["no-squeue", "error", "hangs", "unknown-job", "invalid", "unlimited"],
)
def test_no_deadline_when_squeue_cannot_tell(squeue):
    assert slurm_time_left("42", run=squeue) is None


def test_no_deadline_outside_slurm():
    asked = []
    assert job_time_left({}, query=asked.append) is None
    assert asked == []
    assert job_time_left({"SLURM_JOB_ID": "7"}, query=lambda job: 60.0 if job == "7" else 0.0) == 60


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stops_once_the_time_left_is_below_one_step_and_checkpoint_with_margin():
    clock = Clock()
    deadline = TimeLimit(time_left=lambda: 600.0, clock=clock).deadline(checkpoint_estimate_s=10)
    assert deadline.limited and deadline.time_left() == 600.0
    with deadline.timing_step():
        clock.now += 4.0
    with deadline.timing_step():
        clock.now += 6.0  # the slowest step so far
    with deadline.timing_step():
        clock.now += 5.0
    assert deadline.margin() == SAFETY * (6.0 + 10.0) + FLOOR_S
    margin = deadline.margin()
    clock.now = 1000.0 + 600.0 - margin  # exactly the margin left: one more step fits
    assert not deadline.should_stop()
    clock.now += 0.5
    assert deadline.should_stop()


def test_a_measured_checkpoint_replaces_the_estimate():
    clock = Clock()
    deadline = Deadline(clock() + 300.0, checkpoint_estimate_s=100.0, clock=clock)
    assert deadline.checkpoint_s() == 100.0
    with deadline.timing_checkpoint():
        clock.now += 3.0
    with deadline.timing_checkpoint():
        clock.now += 2.0
    assert deadline.checkpoint_s() == 3.0  # the slowest write measured
    assert deadline.margin() == SAFETY * 3.0 + FLOOR_S


def test_without_a_limit_it_never_stops():
    clock = Clock()
    deadline = TimeLimit(time_left=lambda: None, clock=clock).deadline(checkpoint_estimate_s=1e9)
    assert not deadline.limited and deadline.time_left() == math.inf
    with deadline.timing_step():
        clock.now += 1e6
    assert not deadline.should_stop()
    assert not Deadline.unlimited().should_stop()


def test_checkpoint_estimate_grows_with_its_size():
    # A 7B model's float32 weights and AdamW moments: minutes, not seconds.
    assert 60 < checkpoint_estimate_s(12 * 6_738_000_000) < 3600
    assert checkpoint_estimate_s(0) == 0.0
