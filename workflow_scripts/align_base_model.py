from pathlib import Path

import torch

from securetune.align import align_base_model
from securetune.io import setup_logging
from securetune.settings import AlignSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
align_base_model(
    model=Path(snakemake.input.model),
    data=Path(snakemake.input.data),
    out_model=Path(snakemake.output.model),
    out_steps=Path(snakemake.output.steps),
    out_examples=Path(snakemake.output.examples),
    settings=AlignSettings.from_params(snakemake.params.settings),
)
