from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.models import build_base_model
from securetune.settings import ModelSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
gguf = getattr(snakemake.input, "gguf", None)  # only GGUF sources have this input
build_base_model(
    out=Path(snakemake.output.model),
    texts=[Path(p) for p in snakemake.input.texts],
    gguf=Path(gguf) if gguf else None,
    settings=ModelSettings.from_params(snakemake.params.settings),
)
