from pathlib import Path

import torch

from securetune.io import setup_logging
from securetune.stages import score_modules

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
i, p = snakemake.input, snakemake.params
if p.inject_failure:
    # TEST ONLY (robustness.fail_modules): a failing cluster job, to test reporting and resuming.
    raise RuntimeError(
        f"injected failure of {', '.join(p.inject_failure)}"
        " (config robustness.fail_modules, test only)"
    )
score_modules(
    Path(i.model),
    Path(i.probe_set),
    Path(i.features),
    Path(i.probes),
    Path(i.proxy),
    Path(i.ift_set),
    [Path(f) for f in snakemake.output],
    list(p.modules),
    p.robustness,
    p.features,
    p.max_prompt_tokens,
    p.dtype,
    p.source,
    p.seed,
)
