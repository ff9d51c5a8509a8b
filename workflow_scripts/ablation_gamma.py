from pathlib import Path

from securetune.io import setup_logging
from securetune.report.build import gamma_ablation
from securetune.report.settings import GammaAblationSettings

setup_logging(snakemake.log[0])
i = snakemake.input
gamma_ablation(
    scores=[Path(f) for f in i.scores],
    judged=[Path(f) for f in i.judged],
    ift_losses=[Path(f) for f in i.ift_losses],
    out=Path(snakemake.output[0]),
    settings=GammaAblationSettings.from_params(snakemake.params.settings),
)
