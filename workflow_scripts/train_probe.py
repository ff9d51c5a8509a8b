from pathlib import Path

from securetune.io import setup_logging
from securetune.stages import train_probe

setup_logging(snakemake.log[0])
out = snakemake.output
train_probe(
    Path(snakemake.input[0]),
    Path(out.probes),
    Path(out.accuracy),
    Path(out.proxy),
    snakemake.params.C,
    snakemake.params.proxy_layers,
    snakemake.params.seed,
)
