from pathlib import Path

from securetune.io import setup_logging
from securetune.table_stages import prepare_eval_set

setup_logging(snakemake.log[0])
p = snakemake.params
prepare_eval_set(
    Path(p.data_dir),
    Path(snakemake.input.probe),
    Path(snakemake.output[0]),
    snakemake.wildcards.benchmark,
    p.n,
    p.probe,
    p.seed,
    Path(p.source) if p.source else None,
)
