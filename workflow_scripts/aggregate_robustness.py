from pathlib import Path

from securetune.io import setup_logging
from securetune.table_stages import aggregate_robustness

setup_logging(snakemake.log[0])
aggregate_robustness([Path(p) for p in snakemake.input], Path(snakemake.output[0]))
