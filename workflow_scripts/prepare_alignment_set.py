from pathlib import Path

from securetune.data.alignment import AlignmentSetSettings, prepare_alignment_set
from securetune.io import setup_logging

setup_logging(snakemake.log[0])
prepare_alignment_set(
    data_dir=Path(snakemake.params.data_dir),
    probe_set=Path(snakemake.input.probe),
    out=Path(snakemake.output[0]),
    settings=AlignmentSetSettings.from_params(snakemake.params.settings),
)
