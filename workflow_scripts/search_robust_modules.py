from pathlib import Path

import torch

from securetune.config import SearchConfig
from securetune.io import setup_logging
from securetune.stages import search_robust_modules

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i, p = snakemake.input, snakemake.params
search_robust_modules(
    Path(i.model),
    Path(i.probe_set),
    Path(i.features),
    Path(i.probes),
    Path(i.proxy),
    Path(i.robustness),
    Path(i.ift_set),
    Path(snakemake.output.plan),
    Path(snakemake.output.trace),
    SearchConfig(**p.search),
    p.robustness,
    p.features,
    p.max_prompt_tokens,
    p.dtype,
    p.seed,
)
