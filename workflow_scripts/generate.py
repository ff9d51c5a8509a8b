from pathlib import Path

import torch

from securetune.config import GenerationConfig
from securetune.io import setup_logging
from securetune.stages import generate

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
generate(
    Path(snakemake.input.model),
    Path(snakemake.input.prompts),
    Path(snakemake.output[0]),
    snakemake.wildcards.arm,
    GenerationConfig(**p.generation),
    p.dtype,
    p.seed,
)
