"""The workflow stages that only read and write tables: data preparation, scoring and the
robustness table's aggregation.

Kept apart from `securetune.stages` so that their jobs (dozens per run, a few seconds of work
each) start without importing torch and transformers, which takes longer than the work itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from securetune import data as datasets
from securetune.io import common_provenance, provenance, read_provenance, write_parquet
from securetune.robustness_table import KEY, check_robustness_table
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


def prepare_alignment_set(
    data_dir: Path,
    out: Path,
    align_cfg: dict[str, Any],
    probe: dict[str, Any],
    eval_sizes: dict[str, int],
    ift_source: str,
    ift_n: int,
    seed: int,
) -> None:
    df = datasets.build_alignment_set(
        data_dir,
        align_cfg["harmful"],
        align_cfg["benign"],
        align_cfg["lookalike"],
        seed,
        datasets.ProbeSpec.from_config(probe),
        eval_sizes,
        ift_source,
        ift_n,
    )
    df = datasets.with_refusals(df, seed)
    log.info("alignment set: %s", df.groupby(["role", "source"]).size().to_dict())
    write_parquet(df, out, provenance(seed))


def aggregate_robustness(parts: list[Path], out: Path) -> None:
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.sort_values(KEY).reset_index(drop=True)
    check_robustness_table(df)
    write_parquet(df, out, common_provenance(parts))
