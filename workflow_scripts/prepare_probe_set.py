from pathlib import Path

from securetune.data.probe_set import ProbeSetSettings, prepare_probe_set
from securetune.io import setup_logging

setup_logging(snakemake.log[0])
prepare_probe_set(
    data_dir=Path(snakemake.params.data_dir),
    out=Path(snakemake.output[0]),
    settings=ProbeSetSettings.from_params(snakemake.params.settings),
)
