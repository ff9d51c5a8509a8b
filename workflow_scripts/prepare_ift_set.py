from pathlib import Path

from securetune.data.ift_set import IftSetSettings, prepare_ift_set
from securetune.io import setup_logging

setup_logging(snakemake.log[0])
prepare_ift_set(
    data_dir=Path(snakemake.params.data_dir),
    probe_set=Path(snakemake.input.probe),
    out=Path(snakemake.output[0]),
    settings=IftSetSettings.from_params(snakemake.params.settings),
)
