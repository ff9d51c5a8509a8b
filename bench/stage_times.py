"""Stage-by-stage time of a finished run, from the `benchmark:` files Snakemake wrote.

    python bench/stage_times.py --workdir . [--total-wall 1140]

One row per rule: jobs, summed wall seconds, summed CPU seconds, and the slowest job. On a
2-core machine Snakemake runs two 1-thread jobs at once, so summed wall time exceeds the run's
elapsed time; `--total-wall` (the elapsed time of `snakemake --cores 2`, e.g. from `time`) is
printed beside the sums for that reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def rule_of(path: Path, root: Path, domains: set[str]) -> str:
    """benchmarks/generate/base/advbench.tsv -> generate; benchmarks/train_probe.tsv ->
    train_probe; benchmarks/math/finetune/vanilla.tsv -> finetune (the workflow mirrors each
    rule's outputs under benchmarks/[<domain>/]<rule>/...)."""
    parts = path.relative_to(root).parts
    if parts[0] in domains and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def domains_of(workdir: Path) -> set[str]:
    """The run's domains: the folders of results/ that hold a domain's fine-tunes."""
    return {p.parent.name for p in (workdir / "results").glob("*/finetune")}


def stage_times(workdir: Path) -> pd.DataFrame:
    root = workdir / "benchmarks"
    domains = domains_of(workdir)
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        last = pd.read_csv(path, sep="\t").iloc[-1]  # a rerun appends: keep the latest
        rows.append({"rule": rule_of(path, root, domains), "job": str(path.relative_to(root)),
                     "wall_s": float(last["s"]), "cpu_s": float(last["cpu_time"])})  # fmt: skip
    if not rows:
        raise SystemExit(f"no benchmark files under {root}: run the workflow first")
    df = pd.DataFrame(rows)
    table = df.groupby("rule", sort=False).agg(
        jobs=("job", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"),
        slowest_job_s=("wall_s", "max"),
    )  # fmt: skip
    return table.sort_values("wall_s", ascending=False).round(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--total-wall", type=float, help="elapsed seconds of the whole run")
    args = parser.parse_args()
    table = stage_times(args.workdir)
    print(table.to_markdown())
    print(f"\nsum over jobs: wall {table['wall_s'].sum():.0f} s, CPU {table['cpu_s'].sum():.0f} s")
    if args.total_wall:
        print(f"elapsed (whole run): {args.total_wall:.0f} s")


if __name__ == "__main__":
    main()
