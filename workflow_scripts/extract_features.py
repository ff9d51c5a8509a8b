from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.stages import extract_features

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
extract_features(
    Path(snakemake.input.model),
    Path(snakemake.input.probe_set),
    Path(snakemake.output[0]),
    p.pooling,
    p.batch_size,
    p.max_prompt_tokens,
    p.dtype,
)
