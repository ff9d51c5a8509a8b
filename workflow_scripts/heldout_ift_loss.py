from pathlib import Path

import torch

from securetune.heldout import heldout_ift_loss
from securetune.io import setup_logging
from securetune.settings import HeldoutLossSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
heldout_ift_loss(
    model=Path(snakemake.input.model),
    heldout=Path(snakemake.input.heldout),
    out=Path(snakemake.output[0]),
    arm=snakemake.wildcards.arm,
    settings=HeldoutLossSettings.from_params(snakemake.params.settings),
)
