from pathlib import Path

from securetune.io import setup_logging
from securetune.table_stages import score

setup_logging(snakemake.log[0])
score(Path(snakemake.input[0]), Path(snakemake.output[0]))
