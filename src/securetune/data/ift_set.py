"""Stages `prepare_ift_set` and `prepare_ift_heldout`: benign instruction-tuning examples, and
the held-out rows after them (the task metric), both disjoint from the probe set."""

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
from securetune.data.sources import IFT_SOURCES, DataError
from securetune.domains import domain_spec
from securetune.io import provenance, write_parquet
from securetune.settings import StageSettings


@dataclass(frozen=True)
class IftSetSettings(StageSettings):
    """`n` examples of the IFT `source`, after the probe's slice of it and `skip` more rows."""

    source: str
    n: int
    skip: int
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], domain: str) -> Self:
        """A domain's training set: its `ift_examples` rows of its `ift_source`, after the
        probe's."""
        spec = domain_spec(config, domain)
        return cls(source=spec["ift_source"], n=spec["ift_examples"], skip=0, seed=config["seed"])

    @classmethod
    def heldout_from_config(cls, config: Mapping[str, Any], domain: str) -> Self:
        """A domain's held-out set: its `ift_heldout_examples` rows after the training set's."""
        spec = domain_spec(config, domain)
        return cls(
            source=spec["ift_source"],
            n=spec["ift_heldout_examples"],
            skip=spec["ift_examples"],
            seed=config["seed"],
        )

    @classmethod
    def robustness_from_config(cls, config: Mapping[str, Any]) -> Self:
        """The `ift` perturbation's examples: the first `robustness.ift.examples` rows of
        `robustness.ift.source` after the probe's (the head a domain of that source trains on
        too), shared by every domain like the search they feed."""
        ift = config["robustness"]["ift"]
        return cls(source=ift["source"], n=ift["examples"], skip=0, seed=config["seed"])


def build_ift_set(
    root: Path, source: str, n: int, seed: int, probe_set: pd.DataFrame, skip: int = 0
) -> pd.DataFrame:
    """`n` benign instruction-tuning examples of `source`, after the probe's slice of it and
    `skip` more rows: skip = the training set's size gives the held-out set, the next rows of
    the same shuffled source, which no stage trains on."""
    if source not in IFT_SOURCES:
        raise DataError(f"unknown IFT source '{source}'; allowed: {sorted(IFT_SOURCES)}")
    recs = shuffled(IFT_SOURCES[source](root), seed, source)
    head = probe_slice_size(probe_set, source)
    recs = recs[:head] + without_probe_prompts(recs[head:], probe_set)
    what = f"IFT {'held-out ' if skip else ''}set '{source}'"
    recs = take(recs, head + skip, n, what)
    return pd.DataFrame(
        {
            "example_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "response": [r.response for r in recs],
            "source": source,
        }
    )


def prepare_ift_set(
    *, data_dir: Path, probe_set: Path, out: Path, settings: IftSetSettings
) -> None:
    """Build the IFT (or held-out IFT) set, starting after the probe set's rows, and write it."""
    s = settings
    probe = read_probe_set(probe_set, s.seed)
    df = build_ift_set(data_dir, s.source, s.n, s.seed, probe, s.skip)
    write_parquet(df, out, provenance(s.seed))
