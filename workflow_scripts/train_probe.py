from pathlib import Path

from securetune.io import setup_logging
from securetune.probe import train_probe
from securetune.settings import ProbeSettings

setup_logging(snakemake.log[0])
train_probe(
    features=Path(snakemake.input[0]),
    out_probes=Path(snakemake.output.probes),
    out_accuracy=Path(snakemake.output.accuracy),
    out_proxy=Path(snakemake.output.proxy),
    settings=ProbeSettings.from_params(snakemake.params.settings),
)
