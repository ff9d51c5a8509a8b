"""The workflow stages that only read and write tables: data preparation and scoring.

Kept apart from `securetune.stages` so that their jobs (dozens per run, a few seconds of work
each) start without importing torch and transformers, which takes longer than the work itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from securetune import data as datasets
from securetune.io import provenance, read_provenance, write_parquet
from securetune.scoring import score_generations

log = logging.getLogger(__name__)


def prepare_probe_set(data_dir: Path, out: Path, probe: dict[str, Any], seed: int) -> None:
    """`probe`: the config's data.probe_* keys (see `securetune.data.ProbeSpec.from_config`)."""
    df = datasets.build_probe_set(data_dir, datasets.ProbeSpec.from_config(probe), seed)
    df["seed"] = seed
    log.info("probe set: %s", df.groupby(["split", "label", "source"]).size().to_dict())
    write_parquet(df, out, provenance(seed))


def prepare_ift_set(
    data_dir: Path,
    out: Path,
    source: str,
    n: int,
    probe: dict[str, Any],
    seed: int,
    skip: int = 0,
) -> None:
    spec = datasets.ProbeSpec.from_config(probe)
    df = datasets.build_ift_set(data_dir, source, n, seed, spec, skip)
    write_parquet(df, out, provenance(seed))


def prepare_eval_set(
    data_dir: Path,
    probe_set: Path,
    out: Path,
    benchmark: str,
    n: int,
    probe: dict[str, Any],
    seed: int,
    source: Path | None = None,
) -> None:
    exclude = datasets.probe_prompts(pd.read_parquet(probe_set))
    spec = datasets.ProbeSpec.from_config(probe)
    df = datasets.build_eval_set(data_dir, benchmark, n, seed, spec, source, exclude)
    write_parquet(df, out, provenance(seed))


def score(generations: Path, out: Path) -> None:
    scores = score_generations(pd.read_parquet(generations))
    log.info("%s", scores.groupby(["arm", "benchmark"])["success"].mean().to_dict())
    write_parquet(scores, out, read_provenance(generations))
