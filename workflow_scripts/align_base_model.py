from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.stages import align_base_model

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
align_base_model(
    Path(snakemake.input.model),
    Path(snakemake.input.data),
    Path(snakemake.output.model),
    Path(snakemake.output.steps),
    Path(snakemake.output.examples),
    snakemake.params.align,
    snakemake.params.seed,
    snakemake.params.dtype,
)
