from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.search import search_robust_modules
from securetune.settings import SearchSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i = snakemake.input
search_robust_modules(
    model=Path(i.model),
    probe_set=Path(i.probe_set),
    features=Path(i.features),
    probes=Path(i.probes),
    proxy=Path(i.proxy),
    robustness=Path(i.robustness),
    ift_set=Path(i.ift_set) if hasattr(i, "ift_set") else None,
    out_plan=Path(snakemake.output.plan),
    out_trace=Path(snakemake.output.trace),
    settings=SearchSettings.from_params(snakemake.params.settings),
)
