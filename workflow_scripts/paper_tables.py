from pathlib import Path

from securetune.io import setup_logging
from securetune.report.build import paper_tables

setup_logging(snakemake.log[0])
paper_tables(
    domain_csvs=[Path(f) for f in snakemake.input.domains],
    gamma_csvs=[Path(f) for f in snakemake.input.gamma],
    probe=Path(snakemake.input.probe),
    out_md=Path(snakemake.output.md),
    out_csv=Path(snakemake.output.csv),
    source_model=snakemake.params.source_model,
    confidence=snakemake.params.confidence,
)
