"""The robustness table's schema: its columns, key and perturbations, and the check applied
when the per-module tables are aggregated, and the aggregation stage. Kept apart from
`securetune.robustness` so that the aggregation job starts without torch and transformers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from securetune.io import common_provenance, write_parquet

PERTURBATIONS = ("noise", "ift")
# The per-module robustness metrics (lower = more robust); the score ranks by one or a mix.
METRICS = ("acc_drop", "cosine_drift", "direction_shift", "margin_drop")

ROBUSTNESS_COLUMNS = {
    "layer": "int64",
    "module": "object",
    "perturbation": "object",
    "alpha": "float64",
    "lr": "float64",
    "steps": "int64",
    "seed": "int64",
    "acc_before": "float64",
    "acc_after": "float64",
    "acc_drop": "float64",
    "cosine_drift": "float64",
    "direction_shift": "float64",
    "margin_drop": "float64",
    "score": "float64",
    # The score on each of two disjoint halves of the test prompts (the ranking's split-half check).
    "score_half0": "float64",
    "score_half1": "float64",
    "weight_change": "float64",
    "ift_loss": "float64",
    "n_test": "int64",
    # How many proxy layers the module's drift was averaged over (robustness.proxy_reach).
    "proxy_reached": "int64",
    "cached_prefix": "bool",
    "score_name": "object",
    "model": "object",
    "proxy_layers": "object",
    "proxy_reach": "object",
}
KEY = ["layer", "module", "perturbation", "alpha", "seed"]


def check_robustness_table(df: pd.DataFrame) -> None:
    """Raise if the aggregated table lacks a column or has a wrong dtype."""
    for column, dtype in ROBUSTNESS_COLUMNS.items():
        if column not in df.columns:
            raise ValueError(f"robustness table: missing column '{column}'")
        if str(df[column].dtype) != dtype and not (
            dtype == "object" and str(df[column].dtype) in ("str", "string")
        ):
            raise ValueError(
                f"robustness table: column '{column}' is {df[column].dtype}, expected {dtype}"
            )
    bad = sorted(set(df["perturbation"]) - set(PERTURBATIONS))
    if bad:
        raise ValueError(f"robustness table: unknown perturbation(s) {bad}")
    if df.duplicated(KEY).any():
        raise ValueError("robustness table: duplicate (layer, module, perturbation, alpha, seed)")


def aggregate_robustness(*, parts: list[Path], out: Path) -> None:
    """Stage `aggregate_robustness`: every per-module table in one tidy, schema-checked Parquet
    sorted by its key; tables computed under other seeds, versions or models are refused."""
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    df = df.sort_values(KEY).reset_index(drop=True)
    check_robustness_table(df)
    write_parquet(df, out, common_provenance(parts))
