from pathlib import Path

from securetune.io import setup_logging
from securetune.stages import build_base_model

setup_logging(snakemake.log[0])
build_base_model(
    Path(snakemake.output.model),
    snakemake.params.model,
    [Path(p) for p in snakemake.input.texts],
    snakemake.params.seed,
)
