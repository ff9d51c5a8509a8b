from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.stages import heldout_ift_loss

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
heldout_ift_loss(
    Path(snakemake.input.model),
    Path(snakemake.input.heldout),
    Path(snakemake.output[0]),
    snakemake.wildcards.arm,
    snakemake.params.max_seq_len,
    snakemake.params.batch_size,
    snakemake.params.seed,
)
