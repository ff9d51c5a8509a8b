from pathlib import Path

from securetune.features import check_prompts
from securetune.io import setup_logging
from securetune.settings import PromptCheckSettings

setup_logging(snakemake.log[0])
check_prompts(
    model=Path(snakemake.input.model),
    tables=[Path(p) for p in snakemake.input.tables],
    out=Path(snakemake.output[0]),
    settings=PromptCheckSettings.from_params(snakemake.params.settings),
)
