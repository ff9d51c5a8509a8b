from pathlib import Path

from securetune.io import setup_logging
from securetune.report import build_report

setup_logging(snakemake.log[0])
i, p = snakemake.input, snakemake.params
build_report(
    [Path(f) for f in i.scores],
    [Path(f) for f in i.judged],
    [Path(f) for f in i.losses],
    [Path(f) for f in i.ift_losses],
    dict(p.arm_kinds),
    Path(i.probe),
    Path(i.robustness),
    Path(i.plan),
    Path(i.trace),
    {k: Path(v) for k, v in snakemake.output.items()},
    p.arm_order,
    p.report["bootstrap_samples"],
    p.report["confidence"],
    p.score,
    p.seed,
)
