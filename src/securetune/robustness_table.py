"""The robustness table's schema: its columns, key and perturbations, and the check applied
when the per-module tables are aggregated. Kept apart from `securetune.robustness` so that the
aggregation job starts without torch and transformers."""

from __future__ import annotations

import pandas as pd

PERTURBATIONS = ("noise", "ift")

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
    "score": "float64",
    "weight_change": "float64",
    "ift_loss": "float64",
    "n_test": "int64",
    "cached_prefix": "bool",
    "score_name": "object",
    "model": "object",
    "proxy_layers": "object",
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
