from pathlib import Path

from securetune.io import setup_logging
from securetune.table_stages import prepare_alignment_set

setup_logging(snakemake.log[0])
p = snakemake.params
prepare_alignment_set(
    Path(p.data_dir),
    Path(snakemake.output[0]),
    p.align,
    p.probe,
    p.eval_sizes,
    p.ift_source,
    p.ift_n,
    p.seed,
)
