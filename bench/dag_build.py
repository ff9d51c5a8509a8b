"""Time the dry run of the paper-scale config: how long `snakemake --profile slurm -n` takes to
build the DAG (32 layers x 7 modules, 4 arms, 6 benchmarks) before a single job is submitted.

Usage: python bench/dag_build.py [--repeats 3] [--write BENCHMARKS.md]
Target: under 20 s. configs/paper.yaml has two arms (vanilla, ml_lr); the other arm kinds are
not on main yet, so an overlay adds two more arms of the existing kinds (another learning rate,
another gamma), which gives the DAG the paper's four arms.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 20.0
EXTRA_ARMS = {
    "vanilla_low_lr": {"kind": "vanilla", "lr": 1.0e-5},
    "ml_lr_gamma_03": {"kind": "ml_lr", "gamma": 0.3},
}


def four_arm_overlay(folder: Path) -> Path:
    """The paper config's arms plus EXTRA_ARMS, as an overlay after configs/paper.yaml."""
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    arms = {**paper["finetune"]["arms"], **EXTRA_ARMS}
    path = folder / "four_arms.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"arms": arms}}))
    return path


def dry_run(overlay: Path) -> tuple[float, float, str]:
    """One dry run from the repo root: wall and CPU (user + system) seconds, and its output.

    The CPU time is what the DAG build costs; the wall time also counts waiting for a core,
    which on a shared machine can be most of it (hence the load average in the record)."""
    snakemake = Path(sys.executable).parent / "snakemake"
    cmd = [str(snakemake), "--profile", "slurm", "-n", "--forceall", "--configfile",
           "configs/paper.yaml", str(overlay)]  # fmt: skip
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu, result.stdout + result.stderr


def job_stats(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[-1]
    return {
        m.group(1): int(m.group(2))
        for line in table.splitlines()
        if (m := re.fullmatch(r"(\w+)\s+(\d+)", line.strip()))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, help="append the result to this Markdown file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overlay = four_arm_overlay(Path(tmp))
        runs = [dry_run(overlay) for _ in range(args.repeats)]
    seconds = [wall for wall, _, _ in runs]
    cpu = statistics.median(c for _, c, _ in runs)
    stats = job_stats(runs[0][2])
    # The DAG really is paper scale: every module of the 32 layers, 4 arms, 6 benchmarks.
    assert stats["score_module"] == 32 * 7, stats
    assert stats["finetune"] == 4, stats
    assert stats["generate"] == 5 * 6, stats
    median = statistics.median(seconds)
    verdict = "meets" if median < TARGET_S else "MISSES"
    machine = (
        f"{platform.node()}: {os.cpu_count()} cores {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}"
    )
    line = (
        f"| {datetime.date.today()} | dry-run DAG build, paper config + 2 arms "
        f"({stats['total']} jobs) | {median:.1f} s median of {args.repeats} "
        f"(min {min(seconds):.1f}, max {max(seconds):.1f}); CPU {cpu:.1f} s | "
        f"{verdict} < {TARGET_S:.0f} s | {machine} | "
        f"`python bench/dag_build.py --repeats {args.repeats}` |"
    )
    print(line)
    if args.write:
        with args.write.open("a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
