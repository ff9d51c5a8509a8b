from pathlib import Path

from securetune.io import setup_logging
from securetune.table_stages import prepare_ift_set

setup_logging(snakemake.log[0])
prepare_ift_set(
    Path(snakemake.params.data_dir),
    Path(snakemake.output[0]),
    snakemake.params.source,
    snakemake.params.n,
    snakemake.params.probe,
    snakemake.params.seed,
    snakemake.params.skip,
)
