"""Stopping a fine-tune before its SLURM job's time limit, with a checkpoint written in time.

Killed by the limit, a fine-tune loses the steps since its last checkpoint, and all of them when
the kill comes while a checkpoint replaces the previous one (`checkpoints`: the previous one is
deleted before the new one is written). So when the trainer runs in a SLURM job it asks squeue
once, at the start, how long the job has left, and after every optimizer step compares the time
left with a margin: the slowest step so far plus one checkpoint write (measured, or estimated
from its size until one is measured), times a safety factor, plus a floor. Below the margin it
writes a checkpoint and exits with `STOPPED_BEFORE_TIME_LIMIT`; Snakemake's retry, with a longer
runtime, resumes from that checkpoint. Outside SLURM, or when squeue cannot tell, there is no
deadline. Torch-free: the clock and the source of the time left are injectable.

`SLURM_JOB_ID` reaches the trainer in a job of the Snakemake SLURM executor: the executor's
jobstep plugin runs the rule's command under `srun`, which sets the job's variables for the step
(checked on the test cluster, slurm-wlm 22.05, plugins slurm 2.8.0 / jobstep 0.6.1).
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL ("try again later"): the run is not broken, only out of time. Under
# torchrun the launcher reports every failing worker with its own exit code 1.
STOPPED_BEFORE_TIME_LIMIT = 75
# The margin is SAFETY x (slowest step + one checkpoint write) + FLOOR_S: steps and writes vary
# (another job on the node, a busy file system), and SLURM needs a moment to end the job.
SAFETY = 1.5
FLOOR_S = 30.0
# A checkpoint write's duration before one is measured: its bytes at what a busy shared file
# system sustains for one writer (a local disk is faster, so this errs on the early side).
ASSUMED_WRITE_BYTES_PER_S = 200e6
# What squeue prints for a job without a time limit.
NO_LIMIT = frozenset({"UNLIMITED", "INFINITE", "NOT_SET"})
# squeue's durations: days only with hours (1-02:03:04), hours only with minutes and seconds.
SLURM_DURATION = re.compile(r"(?:(?:(\d+)-)?(\d+):)?(\d+):(\d+)")


class StoppedBeforeTimeLimit(Exception):
    """Training stopped after `step`, its checkpoint written, too near the job's time limit."""

    def __init__(self, step: int, seconds_left: float) -> None:
        super().__init__(
            f"stopped before the time limit after step {step} ({seconds_left:.0f} s left)"
        )
        self.step = step
        self.seconds_left = seconds_left


def parse_slurm_duration(text: str) -> float | None:
    """Seconds in squeue's time format (M:SS, H:MM:SS or D-HH:MM:SS); None for no limit."""
    text = text.strip()
    if text.upper() in NO_LIMIT:
        return None
    match = SLURM_DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a SLURM duration: {text!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_time_left(
    job_id: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> float | None:
    """The job's time left in seconds by squeue; None without a limit or when squeue fails."""
    try:
        result = run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        lines = result.stdout.split()
        if not lines:
            raise ValueError("squeue printed nothing")
        return parse_slurm_duration(lines[0])
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        log.warning(
            "job %s's time left is unknown (%s): no stop before its time limit", job_id, err
        )
        return None


def job_time_left(
    environ: Mapping[str, str] = os.environ,
    query: Callable[[str], float | None] = slurm_time_left,
) -> float | None:
    """Seconds this process's SLURM job has left; None outside SLURM or without a limit."""
    job_id = environ.get("SLURM_JOB_ID")
    return query(job_id) if job_id else None


@dataclass
class Deadline:
    """When the job ends on `clock`, and what the run has measured of its steps and checkpoints.

    `ends_at` is infinite without a time limit: such a deadline never asks to stop.
    """

    ends_at: float
    checkpoint_estimate_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    safety: float = SAFETY
    floor_s: float = FLOOR_S
    slowest_step_s: float = 0.0
    slowest_checkpoint_s: float | None = None

    @classmethod
    def unlimited(cls) -> Deadline:
        return cls(math.inf)

    @property
    def limited(self) -> bool:
        return math.isfinite(self.ends_at)

    def time_left(self) -> float:
        return self.ends_at - self.clock()

    def checkpoint_s(self) -> float:
        """The slowest checkpoint write measured, else the estimate."""
        if self.slowest_checkpoint_s is None:
            return self.checkpoint_estimate_s
        return self.slowest_checkpoint_s

    def margin(self) -> float:
        """Time that must be left to take one more step and still write its checkpoint."""
        return self.safety * (self.slowest_step_s + self.checkpoint_s()) + self.floor_s

    def should_stop(self) -> bool:
        return self.time_left() < self.margin()

    @contextmanager
    def timing_step(self) -> Iterator[None]:
        began = self.clock()
        yield
        self.slowest_step_s = max(self.slowest_step_s, self.clock() - began)

    @contextmanager
    def timing_checkpoint(self) -> Iterator[None]:
        began = self.clock()
        yield
        took = self.clock() - began
        self.slowest_checkpoint_s = max(self.slowest_checkpoint_s or 0.0, took)


@dataclass(frozen=True)
class TimeLimit:
    """Where the job's time left comes from and the clock that counts it down (tests inject
    both; the defaults ask SLURM and use the monotonic clock)."""

    time_left: Callable[[], float | None] = job_time_left
    clock: Callable[[], float] = time.monotonic

    def deadline(self, checkpoint_estimate_s: float) -> Deadline:
        """The job's deadline, counted from now (an unlimited one when no limit is known)."""
        left = self.time_left()
        ends_at = math.inf if left is None else self.clock() + left
        return Deadline(ends_at, checkpoint_estimate_s, self.clock)


def checkpoint_estimate_s(checkpoint_bytes: int) -> float:
    """How long a checkpoint of this size may take to write, before one has been timed."""
    return checkpoint_bytes / ASSUMED_WRITE_BYTES_PER_S
