"""Time the dry run of the paper-scale config: how long `snakemake --profile slurm -n` takes to
build the DAG (32 layers x 7 modules, 4 arms, 6 benchmarks) before a single job is submitted.

Usage: python bench/dag_build.py [--repeats 3] [--write BENCHMARKS.md]
Target: under 20 s. configs/paper.yaml has the paper's four arms (vanilla, ml_lr, freeze, swat)
and 10 benchmarks; the run uses it as the cluster profile does (slurm/config.yaml names it).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 20.0


def dry_run() -> tuple[float, float, str]:
    """One dry run from the repo root: wall and CPU (user + system) seconds, and its output.

    The CPU time is what the DAG build costs; the wall time also counts waiting for a core,
    which on a shared machine can be most of it (hence the load average in the record)."""
    snakemake = Path(sys.executable).parent / "snakemake"
    cmd = [str(snakemake), "--profile", "slurm", "-n", "--forceall"]
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

    runs = [dry_run() for _ in range(args.repeats)]
    seconds = [wall for wall, _, _ in runs]
    cpu = statistics.median(c for _, c, _ in runs)
    stats = job_stats(runs[0][2])
    # The DAG really is paper scale: every module of the 32 layers, 4 arms, 10 benchmarks.
    assert stats["score_module"] == 32 * 7, stats
    assert stats["finetune"] == 4, stats
    assert stats["generate"] == 5 * 10, stats
    median = statistics.median(seconds)
    verdict = "meets" if median < TARGET_S else "MISSES"
    machine = (
        f"{platform.node()}: {os.cpu_count()} cores {platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}"
    )
    line = (
        f"| {datetime.date.today()} | dry-run DAG build, paper config "
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
