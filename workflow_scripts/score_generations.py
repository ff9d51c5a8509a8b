from pathlib import Path

from securetune.io import setup_logging
from securetune.scoring import score_generations

setup_logging(snakemake.log[0])
score_generations(generations=Path(snakemake.input[0]), out=Path(snakemake.output[0]))
