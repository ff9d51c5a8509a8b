from pathlib import Path

from securetune.hub_sources import fetch_benchmark
from securetune.io import setup_logging

setup_logging(snakemake.log[0])
fetch_benchmark(snakemake.wildcards.benchmark, snakemake.params.source, Path(snakemake.output[0]))
