from pathlib import Path

from securetune.data.eval_set import EvalSetSettings, prepare_eval_set
from securetune.io import setup_logging

setup_logging(snakemake.log[0])
prepare_eval_set(
    data_dir=Path(snakemake.params.data_dir),
    source=Path(snakemake.params.source) if snakemake.params.source else None,
    probe_set=Path(snakemake.input.probe),
    out=Path(snakemake.output[0]),
    settings=EvalSetSettings.from_params(snakemake.params.settings),
)
