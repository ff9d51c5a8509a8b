from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.stages import build_base_model

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
gguf = getattr(snakemake.input, "gguf", None)  # only GGUF sources have this input
build_base_model(
    Path(snakemake.output.model),
    snakemake.params.model,
    [Path(p) for p in snakemake.input.texts],
    snakemake.params.seed,
    Path(gguf) if gguf else None,
)
