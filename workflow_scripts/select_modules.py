from pathlib import Path

from securetune.io import setup_logging
from securetune.selectors import select_modules
from securetune.settings import SelectorSettings

setup_logging(snakemake.log[0])
i = snakemake.input
select_modules(
    model=Path(i.model),
    plan=Path(i.plan),
    robustness=Path(i.robustness),
    attribution=Path(i.attribution) if hasattr(i, "attribution") else None,
    out=Path(snakemake.output.plan),
    settings=SelectorSettings.from_params(snakemake.params.settings),
)
