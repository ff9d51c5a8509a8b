from pathlib import Path

from securetune.io import setup_logging
from securetune.stages import check_prompts

setup_logging(snakemake.log[0])
check_prompts(
    Path(snakemake.input.model),
    [Path(p) for p in snakemake.input.tables],
    snakemake.params.max_prompt_tokens,
    Path(snakemake.output[0]),
)
