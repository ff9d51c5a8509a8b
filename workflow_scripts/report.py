from pathlib import Path

from securetune.io import setup_logging
from securetune.report.build import build_report
from securetune.report.settings import ReportSettings

setup_logging(snakemake.log[0])
i = snakemake.input
build_report(
    scores=[Path(f) for f in i.scores],
    judged=[Path(f) for f in i.judged],
    losses=[Path(f) for f in i.losses],
    ift_losses=[Path(f) for f in i.ift_losses],
    probe=Path(i.probe),
    robustness=Path(i.robustness),
    plan=Path(i.plan),
    trace=Path(i.trace),
    selection_plans=[Path(f) for f in i.selection_plans],
    outputs={k: Path(v) for k, v in snakemake.output.items()},
    settings=ReportSettings.from_params(snakemake.params.settings),
)
