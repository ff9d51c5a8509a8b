"""Seeded slices of a source, and what keeps them apart from the probe set.

Every source is shuffled once with the run's seed and cut into disjoint slices in a fixed order:
the probe set takes the head of each source it uses, the evaluation and IFT sets start after
it, and the alignment set takes the tail. The probe set's table (results/data/probe.parquet) is
therefore the record of what the later slices must skip: how many rows of each source, and which
prompt texts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from securetune.data.sources import DataError, Record
from securetune.io import stable_seed


def shuffled(records: list[Record], seed: int, source: str) -> list[Record]:
    """The source's records in a seeded order that depends only on the seed and its name."""
    order = np.random.default_rng(stable_seed(seed, source)).permutation(len(records))
    return [records[i] for i in order]


def take(records: list[Record], start: int, n: int, what: str) -> list[Record]:
    """Rows start .. start + n; asking for more than there are is an error naming `what`."""
    if start + n > len(records):
        raise DataError(
            f"{what}: asked for {n} rows after the first {start}, but the source has {len(records)}"
        )
    return records[start : start + n]


def read_probe_set(path: Path, seed: int) -> pd.DataFrame:
    """The probe set's table, checked to come from the same seed (its slices are that seed's)."""
    probe_set = pd.read_parquet(path)
    seeds = sorted(set(probe_set["seed"].tolist()))
    if seeds != [seed]:
        raise DataError(f"probe set '{path}': built with seed(s) {seeds}, but this run's is {seed}")
    return probe_set


def probe_slice_size(probe_set: pd.DataFrame, source: str) -> int:
    """Rows of a source (after the seeded shuffle) that the probe set took first: it takes each
    source's head, so its rows of that source are the slice every later one starts after."""
    # The substituted twins are made from the AdvBench rows and carry their own source name, so
    # they are not counted twice.
    return int((probe_set["source"] == source).sum())


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def probe_prompts(probe_set: pd.DataFrame) -> frozenset[str]:
    """The probe set's prompts, normalised (case and white space), for `without_probe_prompts`."""
    return frozenset(_normalised(p) for p in probe_set["prompt"])


def without_probe_prompts(records: list[Record], probe_set: pd.DataFrame) -> list[Record]:
    """Drop records whose text is in the probe set: sources overlap (StrongREJECT contains
    AdvBench prompts), so disjoint slices of each source are not enough on their own."""
    taken = probe_prompts(probe_set)
    return [r for r in records if _normalised(r.prompt) not in taken]
