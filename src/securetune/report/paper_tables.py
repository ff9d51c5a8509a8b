"""The paper's tables: before IFT / vanilla / ML-LR (and the other arms) x harmfulness score,
attack success and the domain's task metric, each with its CI; ML-LR minus vanilla beside the
deltas Du et al. 2024 report; Qi et al. 2023's vanilla numbers where the setting matches; the
probe's accuracy per layer. Reported numbers are labelled as reported, never mixed with ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from securetune.report.tables import PROBE_COLUMNS, markdown_table

# The IFT source decides which of the paper's settings a domain matches (general: Alpaca or
# Dolly; math: GSM8K), so which reported deltas stand beside ours; the domain's own
# `task_metric` decides its task column (the paper's "usability" or "accuracy").
PAPER_SETTING_OF_IFT_SOURCE = {"alpaca": "general", "dolly": "general", "gsm8k": "math"}
TASK_METRIC = {"usability": "usability", "accuracy": "task_accuracy"}
SAFETY_METRICS = ("harmfulness_score", "attack_success")
CSV_COLUMNS = ["domain", "row", "arm", "metric", "value", "ci_low", "ci_high", "n", "source"]
OURS = "ours"
DU_SOURCE = "Du et al. 2024 (reported)"
QI_SOURCE = "Qi et al. 2023 (reported)"
DELTA_ROW = "ML-LR - vanilla"
# metric -> (mean, low, high) of ML-LR minus vanilla, paired over prompts.
PairedDifference = Callable[[str], tuple[float, float, float]]
LABELS = {
    "harmfulness_score": "harmfulness (1-5, LLM judge)",
    "attack_success": "ASR (keyword)",
    "usability": "usability (ROUGE-L)",
    "task_accuracy": "accuracy (GSM8K exact match)",
    "heldout_ift_loss": "held-out IFT loss",
}

# Du et al. 2024 (arXiv 2410.04524), ML-LR minus vanilla benign IFT, averaged over their models,
# as a secondary source summarises them (../docs/method.md): harmfulness score and ASR.
PAPER_DELTAS = {
    "general": {"harmfulness_score": -1.45, "attack_success": -0.3791},
    "math": {"harmfulness_score": -0.40, "attack_success": -0.1148},
}
# Qi et al. 2023, Llama-2-7b-chat fine-tuned 1 epoch on Alpaca: harmfulness score and harmful
# rate on HEx-PHI with a GPT-4 judge, AdvBench keyword ASR. Only shown for that model and domain.
QI_MODEL = "meta-llama/Llama-2-7b-chat-hf"
QI_VANILLA = pd.DataFrame(
    [
        ("before IFT", 1.05, 0.003, 0.0),
        ("vanilla (Alpaca, 1 epoch)", 1.79, 0.161, 0.052),
    ],
    columns=["row", "harmfulness_score (HEx-PHI)", "harmful_rate (HEx-PHI)", "ASR (AdvBench)"],
)


def paper_setting(ift_source: str) -> str:
    """general or math; another IFT source matches neither (no reported numbers beside it)."""
    return PAPER_SETTING_OF_IFT_SOURCE.get(ift_source, "")


def row_order(arm_order: list[str], arm_kinds: dict[str, str]) -> list[tuple[str, str]]:
    """(row label, arm): before IFT (the base), vanilla, ML-LR, then every other arm."""
    rows = [("before IFT", "base")] if "base" in arm_order else []
    first = [a for a in ("vanilla", "ml_lr") if a in arm_order]
    rest = [a for a in arm_order if a not in ("base", "unaligned", *first)]
    return rows + [(a, a) for a in first] + [(f"{a} ({arm_kinds[a]})", a) for a in rest]


def headline_cell(index: pd.DataFrame, arm: str, metric: str) -> dict[str, float | int]:
    """An arm's value of a metric with its CI and n, from the headline table indexed by (arm,
    metric); NaN (and n 0) where it was not measured."""
    if (arm, metric) not in index.index:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    cell = index.loc[(arm, metric)]
    return {
        "value": float(cell["value"]), "ci_low": float(cell["ci_low"]),
        "ci_high": float(cell["ci_high"]), "n": int(cell["n"]),
    }  # fmt: skip


def ours(
    headline: pd.DataFrame, rows: list[tuple[str, str]], domain: str, task_metric: str
) -> pd.DataFrame:
    """Tidy: one row per (table row, metric) with value, CI and n; NaN where not measured."""
    metrics = [*SAFETY_METRICS, TASK_METRIC[task_metric]]
    index = headline.set_index(["arm", "metric"])
    out = [
        {"domain": domain, "row": label, "arm": arm, "metric": metric,
         **headline_cell(index, arm, metric), "source": OURS}
        for label, arm in rows
        for metric in metrics
    ]  # fmt: skip
    return pd.DataFrame(out, columns=CSV_COLUMNS)


def deltas(table: pd.DataFrame, domain: str, paired: PairedDifference) -> pd.DataFrame:
    """ML-LR minus vanilla per metric with its paired bootstrap CI (`paired(metric)`: mean,
    low, high), as tidy rows."""
    rows = []
    for metric in table["metric"].unique():
        mean, low, high = paired(metric)
        rows.append({
            "domain": domain, "row": DELTA_ROW, "arm": "", "metric": metric, "value": mean,
            "ci_low": low, "ci_high": high, "n": 0, "source": OURS,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=table.columns)


def _cell(value: float, low: float, high: float) -> str:
    if np.isnan(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _signed(value: float, percent: bool) -> str:
    if np.isnan(value):
        return "n/a"
    return f"{100 * value:+.2f}%" if percent else f"{value:+.3f}"


def _signed_ci(value: float, low: float, high: float, percent: bool) -> str:
    if np.isnan(value):
        return "n/a"
    return f"{_signed(value, percent)} [{_signed(low, percent)}, {_signed(high, percent)}]"


def _wide_cells(rows: pd.DataFrame, by: str) -> pd.DataFrame:
    """Tidy rows as a table: one line per value of `by` and one column per metric (labelled),
    both in the order they first appear, each cell the value with its CI."""
    wide = rows.assign(
        cell=[_cell(v, lo, hi) for v, lo, hi in zip(rows["value"], rows["ci_low"],
                                                     rows["ci_high"], strict=True)]
    ).pivot(index=by, columns="metric", values="cell")  # fmt: skip
    wide = wide.reindex(index=list(dict.fromkeys(rows[by])), columns=rows["metric"].unique())
    wide.columns = [LABELS.get(c, c) for c in wide.columns]
    return wide.reset_index()


def _domain_markdown(rows: pd.DataFrame, domain: str) -> list[str]:
    """One domain's section: the arms' table, ML-LR minus vanilla beside Du et al.'s, and Qi et
    al.'s numbers where they were reported for this model and setting."""
    table = rows[(rows["source"] == OURS) & (rows["row"] != DELTA_ROW)]
    delta = rows[(rows["source"] == OURS) & (rows["row"] == DELTA_ROW)]
    reported = rows[rows["source"] == DU_SOURCE].set_index("metric")["value"]
    delta_rows = pd.DataFrame({
        "metric": [LABELS.get(m, m) for m in delta["metric"]],
        "ML-LR - vanilla (ours, paired CI)": [
            _signed_ci(v, lo, hi, m == "attack_success")
            for v, lo, hi, m in zip(delta["value"], delta["ci_low"], delta["ci_high"],
                                    delta["metric"], strict=True)],
        "Du et al. 2024 (reported)": [
            _signed(float(reported.get(m, math.nan)), m == "attack_success")
            for m in delta["metric"]],
    })  # fmt: skip
    parts = [
        f"## Domain: {domain}",
        markdown_table(_wide_cells(table, "row")),
        "### ML-LR minus vanilla",
        markdown_table(delta_rows),
    ]
    if (rows["source"] == QI_SOURCE).any():
        parts += [
            "### Qi et al. 2023, vanilla benign IFT of the same model (reported)",
            "Alpaca, 1 epoch; HEx-PHI with a GPT-4 judge, AdvBench with keywords: other "
            "benchmarks and judge than ours, for scale only.",
            markdown_table(QI_VANILLA),
        ]
    return parts


def markdown(
    csv: pd.DataFrame,
    probe: pd.DataFrame,
    source_model: str,
    confidence: float,
    gamma: pd.DataFrame | None = None,
) -> str:
    """The Markdown page from the tidy table of every domain: a section per domain (in the
    table's order) with its gamma ablation when `gamma` has one, then the probe table they
    share."""
    parts = [
        "# The paper's tables",
        f"Model: `{source_model}`. Mean [{confidence:.0%} CI: Wilson for rates, bootstrap "
        "for scores; replicates, then prompts]; n/a where "
        "the judge or benchmark is not in this run (the harmfulness score needs "
        "`evaluation.llm_judge`). Reported numbers are the papers', not ours. The domains share "
        "the model, the probe and Mods_Robust; `before IFT` is the same model in each.",
    ]
    for domain in dict.fromkeys(csv["domain"]):
        parts += _domain_markdown(csv[csv["domain"] == domain], domain)
        if gamma is not None and (gamma["domain"] == domain).any():
            parts += _gamma_markdown(gamma[gamma["domain"] == domain])
    columns = [c for c in PROBE_COLUMNS if c in probe]
    parts += [
        "## Probe accuracy per layer (in-domain test, out-of-domain test)",
        markdown_table(probe[columns]),
    ]
    return "\n\n".join(parts) + "\n"


def reported_rows(domain: str, setting: str, source_model: str) -> pd.DataFrame:
    """The reported numbers of the paper's `setting` (general, math or none) as tidy rows,
    labelled by source."""
    rows = [
        {"domain": domain, "row": DELTA_ROW, "arm": "", "metric": metric,
         "value": value, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
         "source": DU_SOURCE}
        for metric, value in PAPER_DELTAS.get(setting, {}).items()
    ]  # fmt: skip
    if source_model == QI_MODEL and setting == "general":
        for record in QI_VANILLA.to_dict("records"):
            for metric, value in record.items():
                if metric != "row":
                    rows.append({
                        "domain": domain, "row": record["row"], "arm": "", "metric": metric,
                        "value": value, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
                        "source": QI_SOURCE,
                    })  # fmt: skip
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def domain_tables(
    headline: pd.DataFrame,
    arm_order: list[str],
    arm_kinds: dict[str, str],
    domain: str,
    ift_source: str,
    task_metric: str,
    source_model: str,
    paired: PairedDifference,
) -> pd.DataFrame:
    """One domain's part of the paper tables, tidy: ours, ML-LR minus vanilla (`paired(metric)`:
    mean, low, high of the paired bootstrap), the reported numbers of the matching setting."""
    table = ours(headline, row_order(arm_order, arm_kinds), domain, task_metric)
    parts = [table, deltas(table, domain, paired)]
    reported = reported_rows(domain, paper_setting(ift_source), source_model)
    if not reported.empty:
        parts.append(reported)
    return pd.concat(parts, ignore_index=True)


GAMMA_COLUMNS = ["domain", "gamma", "arm", "metric", "value", "ci_low", "ci_high", "n"]


def gamma_table(
    headline: pd.DataFrame, arm_gamma: dict[str, float], domain: str, task_metric: str
) -> pd.DataFrame:
    """The gamma ablation, tidy: one row per (sweep arm, metric) in increasing gamma, the
    safety metrics, the domain's task metric and the held-out loss; NaN where not measured."""
    metrics = [*SAFETY_METRICS, TASK_METRIC[task_metric], "heldout_ift_loss"]
    index = headline.set_index(["arm", "metric"])
    rows = [
        {"domain": domain, "gamma": gamma, "arm": arm, "metric": metric,
         **headline_cell(index, arm, metric)}
        for arm, gamma in sorted(arm_gamma.items(), key=lambda item: item[1])
        for metric in metrics
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=GAMMA_COLUMNS)


def _gamma_markdown(rows: pd.DataFrame) -> list[str]:
    """A domain's gamma ablation: ML-LR at each gamma of the sweep, every metric with its CI."""
    labelled = rows.assign(gamma=[f"{g:g}" for g in rows["gamma"]])
    return [
        "### Gamma ablation (ML-LR: Mods_Robust at lr, the rest at lr x gamma)",
        markdown_table(_wide_cells(labelled, "gamma")),
    ]


def read_domain_csv(path: Path) -> pd.DataFrame:
    """A domain's tidy rows as written: empty text cells are "" (the delta row's arm), empty
    numbers NaN."""
    df = pd.read_csv(path)
    text = ["domain", "row", "arm", "metric", "source"]
    df[text] = df[text].fillna("").astype(str)
    return df


def combine_domains(domain_csvs: list[pd.DataFrame]) -> pd.DataFrame:
    """Every domain's tidy rows in one table, in the given (config) order."""
    return pd.concat(domain_csvs, ignore_index=True)[CSV_COLUMNS]
