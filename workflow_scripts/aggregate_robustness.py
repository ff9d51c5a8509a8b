from pathlib import Path

from securetune.io import setup_logging
from securetune.robustness_table import aggregate_robustness

setup_logging(snakemake.log[0])
aggregate_robustness(parts=[Path(p) for p in snakemake.input], out=Path(snakemake.output[0]))
