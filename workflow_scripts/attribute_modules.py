from pathlib import Path

import torch

from securetune.attribution import attribute_modules
from securetune.io import setup_logging
from securetune.settings import AttributionSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i = snakemake.input
attribute_modules(
    model=Path(i.model),
    probe_set=Path(i.probe_set),
    utility_set=Path(i.utility_set),
    out=Path(snakemake.output.table),
    settings=AttributionSettings.from_params(snakemake.params.settings),
)
