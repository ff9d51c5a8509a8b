from pathlib import Path

from securetune.io import setup_logging
from securetune.stages import prepare_eval_set

setup_logging(snakemake.log[0])
prepare_eval_set(
    Path(snakemake.params.data_dir),
    Path(snakemake.output[0]),
    snakemake.wildcards.benchmark,
    snakemake.params.n,
    snakemake.params.probe,
    snakemake.params.seed,
)
