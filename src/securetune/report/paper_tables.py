"""The paper's tables: before IFT / vanilla / ML-LR (and the other arms) x harmfulness score,
attack success and the domain's task metric, each with its CI; ML-LR minus vanilla beside the
deltas Du et al. 2024 report; Qi et al. 2023's vanilla numbers where the setting matches; the
probe's accuracy per layer. Reported numbers are labelled as reported, never mixed with ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from securetune.report.tables import PROBE_COLUMNS, markdown_table

# The IFT source decides the domain, and the domain its task metric (the paper's "usability"
# for the general domain, "accuracy" for math).
DOMAIN_OF_IFT_SOURCE = {"alpaca": "general", "dolly": "general", "gsm8k": "math"}
TASK_METRIC = {"general": "usability", "math": "task_accuracy"}
SAFETY_METRICS = ("harmfulness_score", "attack_success")
# metric -> (mean, low, high) of ML-LR minus vanilla, paired over prompts.
PairedDifference = Callable[[str], tuple[float, float, float]]
LABELS = {
    "harmfulness_score": "harmfulness (1-5, LLM judge)",
    "attack_success": "ASR (keyword)",
    "usability": "usability (ROUGE-L)",
    "task_accuracy": "accuracy (GSM8K exact match)",
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


def domain_of(ift_source: str) -> str:
    """general or math; another IFT source is its own domain, named after it."""
    return DOMAIN_OF_IFT_SOURCE.get(ift_source, ift_source)


def row_order(arm_order: list[str], arm_kinds: dict[str, str]) -> list[tuple[str, str]]:
    """(row label, arm): before IFT (the base), vanilla, ML-LR, then every other arm."""
    rows = [("before IFT", "base")] if "base" in arm_order else []
    first = [a for a in ("vanilla", "ml_lr") if a in arm_order]
    rest = [a for a in arm_order if a not in ("base", "unaligned", *first)]
    return rows + [(a, a) for a in first] + [(f"{a} ({arm_kinds[a]})", a) for a in rest]


def ours(headline: pd.DataFrame, rows: list[tuple[str, str]], domain: str) -> pd.DataFrame:
    """Tidy: one row per (table row, metric) with value, CI and n; NaN where not measured."""
    metrics = [*SAFETY_METRICS, TASK_METRIC.get(domain, "usability")]
    index = headline.set_index(["arm", "metric"])
    out = []
    for label, arm in rows:
        for metric in metrics:
            found = (arm, metric) in index.index
            cell = index.loc[(arm, metric)] if found else None
            out.append({
                "domain": domain, "row": label, "arm": arm, "metric": metric,
                "value": float(cell["value"]) if found else math.nan,
                "ci_low": float(cell["ci_low"]) if found else math.nan,
                "ci_high": float(cell["ci_high"]) if found else math.nan,
                "n": int(cell["n"]) if found else 0, "source": "ours",
            })  # fmt: skip
    return pd.DataFrame(out)


def deltas(table: pd.DataFrame, domain: str, paired: PairedDifference) -> pd.DataFrame:
    """ML-LR minus vanilla per metric, ours with its paired bootstrap CI (`paired(metric)`:
    mean, low, high), beside the paper's."""
    rows = []
    for metric in table["metric"].unique():
        mean, low, high = paired(metric)
        rows.append({
            "domain": domain, "metric": metric, "ours": mean, "ci_low": low, "ci_high": high,
            "paper_reported": PAPER_DELTAS.get(domain, {}).get(metric, math.nan),
        })  # fmt: skip
    return pd.DataFrame(rows)


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


def markdown(
    table: pd.DataFrame,
    delta: pd.DataFrame,
    probe: pd.DataFrame,
    source_model: str,
    confidence: float,
) -> str:
    """The Markdown page: per domain the arms' table, the deltas, the reported numbers; the
    probe table."""
    domain = table["domain"].iloc[0]
    wide = table.assign(
        cell=[_cell(v, lo, hi) for v, lo, hi in zip(table["value"], table["ci_low"],
                                                     table["ci_high"], strict=True)]
    ).pivot(index="row", columns="metric", values="cell")  # fmt: skip
    wide = wide.reindex(index=list(dict.fromkeys(table["row"])), columns=table["metric"].unique())
    wide.columns = [LABELS.get(c, c) for c in wide.columns]
    delta_rows = pd.DataFrame({
        "metric": [LABELS.get(m, m) for m in delta["metric"]],
        "ML-LR - vanilla (ours, paired CI)": [
            _signed_ci(v, lo, hi, m == "attack_success")
            for v, lo, hi, m in zip(delta["ours"], delta["ci_low"], delta["ci_high"],
                                    delta["metric"], strict=True)],
        "Du et al. 2024 (reported)": [
            _signed(v, m == "attack_success") for v, m in zip(delta["paper_reported"],
                                                              delta["metric"], strict=True)],
    })  # fmt: skip
    parts = [
        "# The paper's tables",
        f"Model: `{source_model}`. Mean [{confidence:.0%} bootstrap CI over prompts]; n/a where "
        "the judge or benchmark is not in this run (the harmfulness score needs "
        "`evaluation.llm_judge`). Reported numbers are the papers', not ours.",
        f"## Domain: {domain}",
        markdown_table(wide.reset_index()),
        "### ML-LR minus vanilla",
        markdown_table(delta_rows),
    ]
    if source_model == QI_MODEL and domain == "general":
        parts += [
            "### Qi et al. 2023, vanilla benign IFT of the same model (reported)",
            "Alpaca, 1 epoch; HEx-PHI with a GPT-4 judge, AdvBench with keywords: other "
            "benchmarks and judge than ours, for scale only.",
            markdown_table(QI_VANILLA),
        ]
    columns = [c for c in PROBE_COLUMNS if c in probe]
    parts += [
        "## Probe accuracy per layer (in-domain test, out-of-domain test)",
        markdown_table(probe[columns]),
    ]
    return "\n\n".join(parts) + "\n"


def reported_rows(domain: str, source_model: str) -> pd.DataFrame:
    """The reported numbers as tidy CSV rows, labelled by source."""
    rows = [
        {"domain": domain, "row": "ML-LR - vanilla", "arm": "", "metric": metric,
         "value": value, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
         "source": "Du et al. 2024 (reported)"}
        for metric, value in PAPER_DELTAS.get(domain, {}).items()
    ]  # fmt: skip
    if source_model == QI_MODEL and domain == "general":
        for record in QI_VANILLA.to_dict("records"):
            for metric, value in record.items():
                if metric != "row":
                    rows.append({
                        "domain": domain, "row": record["row"], "arm": "", "metric": metric,
                        "value": value, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
                        "source": "Qi et al. 2023 (reported)",
                    })  # fmt: skip
    return pd.DataFrame(rows)


def paper_tables(
    headline: pd.DataFrame,
    probe: pd.DataFrame,
    arm_order: list[str],
    arm_kinds: dict[str, str],
    ift_source: str,
    source_model: str,
    confidence: float,
    paired: PairedDifference,
) -> tuple[str, pd.DataFrame]:
    """(the Markdown page, the tidy CSV table: ours, our deltas, the reported numbers).
    `paired(metric)` is ML-LR minus vanilla on that metric with its paired CI."""
    domain = domain_of(ift_source)
    table = ours(headline, row_order(arm_order, arm_kinds), domain)
    delta = deltas(table, domain, paired)
    delta_rows = delta.rename(columns={"ours": "value"}).assign(
        row="ML-LR - vanilla", arm="", n=0, source="ours"
    )[table.columns]
    csv = pd.concat([table, delta_rows, reported_rows(domain, source_model)], ignore_index=True)
    return markdown(table, delta, probe, source_model, confidence), csv
