from pathlib import Path

import torch

from securetune.features import extract_features
from securetune.io import setup_logging
from securetune.settings import FeatureSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
extract_features(
    model=Path(snakemake.input.model),
    probe_set=Path(snakemake.input.probe_set),
    out=Path(snakemake.output[0]),
    settings=FeatureSettings.from_params(snakemake.params.settings),
)
