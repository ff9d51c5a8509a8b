from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.robustness import raise_injected_failure, score_modules
from securetune.settings import RobustnessSettings

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
outs = [Path(f) for f in snakemake.output]
raise_injected_failure(outs, snakemake.config["robustness"].get("fail_modules", []))
score_modules(
    model=Path(snakemake.input.model),
    probe_set=Path(snakemake.input.probe_set),
    features=Path(snakemake.input.features),
    probes=Path(snakemake.input.probes),
    proxy=Path(snakemake.input.proxy),
    ift_set=Path(snakemake.input.ift_set) if hasattr(snakemake.input, "ift_set") else None,
    outs=outs,
    settings=RobustnessSettings.from_params(snakemake.params.settings),
)
