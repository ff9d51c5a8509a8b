"""Stage `prepare_probe_set`: harmful vs benign look-alike prompts, with a train/test split and an
out-of-domain test split.

Benign look-alikes for the probe: a probe that only learns "AdvBench style vs anything else"
would look perfect and find nothing about safety. So the benign class mixes (a) XSTest's safe
prompts (surface-harmful words, benign intent), (b) the probe's own AdvBench prompts with their
harmful words swapped by a fixed list (`securetune.data.substitutions`: the same sentence frame,
benign intent, the paper's recipe), and (c) plain Alpaca instructions. An out-of-domain split
(HarmBench or StrongREJECT vs Self-Instruct or Dolly) that the probe never trains on tells
whether it learned harmfulness or AdvBench's phrasing.

The probe set takes the head of each shuffled source; its table is what every later slice reads
to start after it (`securetune.data.slices`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from securetune.data.slices import shuffled, take
from securetune.data.sources import (
    BENIGN_MIX_SOURCES,
    OOD_BENIGN,
    OOD_HARMFUL,
    DataError,
    Record,
    load_advbench,
    load_alpaca,
    load_xstest_safe,
)
from securetune.data.substitutions import substitute_harmful_words
from securetune.io import provenance, stable_seed, write_parquet
from securetune.settings import StageSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSpec:
    """What the probe set takes from each source (the config's `data.probe_*` keys)."""

    per_class: int
    test_fraction: float
    benign_mix: dict[str, float]
    ood_per_class: int = 0
    ood_harmful: str = "harmbench_val"
    ood_benign: str = "self_instruct"

    def benign_counts(self) -> dict[str, int]:
        """Rows per benign source: per_class split by the mix weights (largest remainder)."""
        unknown = sorted(set(self.benign_mix) - set(BENIGN_MIX_SOURCES))
        if unknown:
            raise DataError(
                f"data.probe_benign_mix: unknown source(s) {unknown}; allowed: "
                f"{list(BENIGN_MIX_SOURCES)}"
            )
        weights = np.array([float(self.benign_mix.get(s, 0.0)) for s in BENIGN_MIX_SOURCES])
        if (weights < 0).any() or weights.sum() <= 0:
            raise DataError("data.probe_benign_mix: weights must be >= 0 with a positive sum")
        exact = weights / weights.sum() * self.per_class
        counts = np.floor(exact).astype(int)
        # Largest remainder; ties go to the earlier source, so the counts are deterministic.
        for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))[
            : self.per_class - counts.sum()
        ]:
            counts[i] += 1
        return dict(zip(BENIGN_MIX_SOURCES, counts.tolist(), strict=True))


@dataclass(frozen=True)
class ProbeSetSettings(StageSettings):
    """Settings of `prepare_probe_set`: what the probe takes from each source, and the seed."""

    probe: ProbeSpec
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.probe, Mapping):  # from `from_params`: the JSON of a ProbeSpec
            object.__setattr__(self, "probe", ProbeSpec(**self.probe))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """From the config's `data.probe_*` keys and `seed`."""
        data = config["data"]
        probe = ProbeSpec(
            per_class=data["probe_per_class"],
            test_fraction=data["probe_test_fraction"],
            benign_mix=dict(data["probe_benign_mix"]),
            ood_per_class=data["probe_ood_per_class"],
            ood_harmful=data["probe_ood_harmful"],
            ood_benign=data["probe_ood_benign"],
        )
        return cls(probe=probe, seed=config["seed"])


def _split_rows(n: int, n_test: int, seed: int, what: str) -> np.ndarray:
    """'test' for n_test seeded-random rows of n, 'train' for the rest."""
    order = np.random.default_rng(stable_seed(seed, "probe_split", what)).permutation(n)
    return np.where(np.isin(np.arange(n), order[:n_test]), "test", "train")


def _frame(recs: list[Record], label: int, source: str, split, origin=None, n_subst=None):
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "label": label,
            "source": source,
            "split": split,
            "origin_id": origin if origin is not None else "",
            "n_substitutions": n_subst if n_subst is not None else 0,
        }
    )


def _substituted_twins(
    harmful: list[Record], harmful_split: np.ndarray, wanted: int
) -> pd.DataFrame:
    """The first `wanted` harmful prompts that contain a listed word, with the words swapped;
    each twin keeps its original's split."""
    twins, twin_split, origins, n_subst = [], [], [], []
    for rec, split in zip(harmful, harmful_split, strict=True):
        if len(twins) == wanted:
            break
        text, k = substitute_harmful_words(rec.prompt)
        if k:
            number = rec.id.split(":")[1]
            twins.append(Record(f"advbench_substituted:{number}", text))
            twin_split.append(split)
            origins.append(rec.id)
            n_subst.append(k)
    if len(twins) < wanted:
        raise DataError(
            f"data.probe_benign_mix: {wanted} substituted AdvBench twins asked for, but only "
            f"{len(twins)} of the {len(harmful)} probe prompts contain a listed word"
        )
    split = np.array(twin_split, dtype=object)
    return _frame(twins, 0, "advbench_substituted", split, origins, n_subst)


def _other_benign(
    root: Path, counts: dict[str, int], seed: int, n_test: int, twin_test: int
) -> list[pd.DataFrame]:
    """The XSTest and Alpaca rows of the benign class, split to fill its test share."""
    xstest = take(
        shuffled(load_xstest_safe(root), seed, "xstest_safe"),
        0,
        counts["xstest_safe"],
        "probe benign (xstest_safe)",
    )
    alpaca = take(
        shuffled(load_alpaca(root), seed, "alpaca"), 0, counts["alpaca"], "probe benign (alpaca)"
    )
    # These rows fill the benign test share up to the harmful one, so both classes have the
    # same test count whenever the twins allow it.
    n_other = counts["xstest_safe"] + counts["alpaca"]
    other_split = _split_rows(n_other, min(n_other, max(0, n_test - twin_test)), seed, "benign")
    return [
        _frame(xstest, 0, "xstest_safe", other_split[: counts["xstest_safe"]]),
        _frame(alpaca, 0, "alpaca", other_split[counts["xstest_safe"] :]),
    ]


def _out_of_domain(root: Path, spec: ProbeSpec, seed: int) -> list[pd.DataFrame]:
    """The 'ood_test' split: `ood_per_class` rows of each out-of-domain source, or none."""
    if not spec.ood_per_class:
        return []
    frames = []
    for label, name, loaders in (
        (1, spec.ood_harmful, OOD_HARMFUL),
        (0, spec.ood_benign, OOD_BENIGN),
    ):
        if name not in loaders:
            key = "probe_ood_harmful" if label else "probe_ood_benign"
            raise DataError(f"data.{key}: unknown source '{name}'; allowed: {sorted(loaders)}")
        recs = take(
            shuffled(loaders[name](root), seed, name),
            0,
            spec.ood_per_class,
            f"probe out-of-domain ({name})",
        )
        frames.append(_frame(recs, label, name, "ood_test"))
    return frames


def build_probe_set(root: Path, spec: ProbeSpec, seed: int) -> pd.DataFrame:
    """Harmful (AdvBench) vs benign look-alikes, balanced; train/test split with the seed; plus an
    out-of-domain test split ('ood_test') from sources the probe never trains on.

    A substituted twin shares its AdvBench original's split, so no sentence frame is seen in
    training and tested on. Columns: prompt_id, prompt, label, source, split, origin_id (the row a
    twin was made from), n_substitutions.
    """
    n = spec.per_class
    harmful = take(shuffled(load_advbench(root), seed, "advbench"), 0, n, "probe harmful")
    n_test = max(1, round(n * spec.test_fraction))
    harmful_split = _split_rows(n, n_test, seed, "harmful")
    counts = spec.benign_counts()
    twins = _substituted_twins(harmful, harmful_split, counts["advbench_substituted"])
    twin_test = sum(s == "test" for s in twins["split"])
    frames = [
        _frame(harmful, 1, "advbench", harmful_split),
        twins,
        *_other_benign(root, counts, seed, n_test, twin_test),
        *_out_of_domain(root, spec, seed),
    ]
    df = pd.concat(frames, ignore_index=True)
    df["split"] = df["split"].astype(str)
    return df.sort_values(["split", "label", "prompt_id"]).reset_index(drop=True)


def prepare_probe_set(*, data_dir: Path, out: Path, settings: ProbeSetSettings) -> None:
    """Build the probe set from the bundled data and write it, with its seed, to `out`."""
    df = build_probe_set(data_dir, settings.probe, settings.seed)
    df["seed"] = settings.seed
    log.info("probe set: %s", df.groupby(["split", "label", "source"]).size().to_dict())
    write_parquet(df, out, provenance(settings.seed))
