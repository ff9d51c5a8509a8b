"""Stage `prepare_eval_set`: held-out prompts of one benchmark, none of them in the probe set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pandas as pd

from securetune.data.slices import (
    probe_slice_size,
    read_probe_set,
    shuffled,
    take,
    without_probe_prompts,
)
from securetune.data.sources import BENCHMARKS, NOT_BUNDLED, DataError
from securetune.io import provenance, write_parquet
from securetune.settings import StageSettings


@dataclass(frozen=True)
class EvalSetSettings(StageSettings):
    """`n` held-out prompts of `benchmark`, shuffled with `seed`."""

    benchmark: str
    n: int
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], benchmark: str) -> Self:  # type: ignore[override]
        """One benchmark's size from `evaluation.benchmarks`: changing it reruns only that job."""
        n = config["evaluation"]["benchmarks"][benchmark]
        return cls(benchmark=benchmark, n=n, seed=config["seed"])


def build_eval_set(
    root: Path,
    benchmark: str,
    n: int,
    seed: int,
    probe_set: pd.DataFrame,
    source: Path | None = None,
) -> pd.DataFrame:
    """`n` held-out prompts of a benchmark, from the bundled copy in `root` or from `source`,
    the user's folder with the full set under the same file name(s) as the bundled copy.

    Disjoint from the probe set twice over: the probe's slice of the shuffled bundled source is
    skipped, and any prompt whose text is in the probe set is dropped, which also holds when a
    full copy reorders or extends the bundled one (its head is not skipped: it is another order).
    """
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}'; allowed: {sorted(BENCHMARKS)}")
    if source is None and benchmark in NOT_BUNDLED:
        raise DataError(
            f"benchmark '{benchmark}' is not bundled (gated); give its folder in "
            f"config key 'evaluation.sources.{benchmark}'"
        )
    if source is not None and not source.is_dir():
        raise DataError(f"config key 'evaluation.sources.{benchmark}': '{source}' is not a folder")
    folder = root if source is None else source
    recs = shuffled(BENCHMARKS[benchmark].loader(folder), seed, benchmark)
    skip = probe_slice_size(probe_set, benchmark) if source is None else 0
    held_out = without_probe_prompts(recs[skip:], probe_set)
    recs = take(held_out, 0, n, f"benchmark '{benchmark}' (after removing probe prompts)")
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "benchmark": benchmark,
            "kind": BENCHMARKS[benchmark].kind,
            "category": [r.category for r in recs],
            "reference": [r.reference for r in recs],
        }
    )


def prepare_eval_set(
    *, data_dir: Path, source: Path | None, probe_set: Path, out: Path, settings: EvalSetSettings
) -> None:
    """Build one benchmark's evaluation set, disjoint from the probe set's table, and write it."""
    s = settings
    probe = read_probe_set(probe_set, s.seed)
    df = build_eval_set(data_dir, s.benchmark, s.n, s.seed, probe, source)
    write_parquet(df, out, provenance(s.seed))
