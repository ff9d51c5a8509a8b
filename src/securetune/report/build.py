"""Stage 9's entry function: read the stage tables, write the report's CSVs, figures and
Markdown. The numbers are in `stats`, the text in `tables`, the PNGs in `figures`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from securetune.io import atomic_path, read_provenance
from securetune.judges import unsafe_rate_per_category
from securetune.report import figures, tables
from securetune.report.paper_tables import (
    combine_domains,
    domain_tables,
    gamma_table,
    markdown,
    read_domain_csv,
)
from securetune.report.settings import GammaAblationSettings, ReportSettings
from securetune.report.stats import (
    frontier_verdicts,
    headline_rates,
    paired_difference,
    selector_comparison,
    summarise_scores,
)
from securetune.robustness_table import METRICS

log = logging.getLogger(__name__)

# The held-out loss table's columns: an empty one when no arm was scored on held-out IFT data.
IFT_LOSS_COLUMNS = ["example_id", "arm", "benchmark", "kind", "loss"]
# The judges whose verdict tables have their own headline columns.
JUDGES = ("guard", "llm")


@dataclass(frozen=True)
class ReportInputs:
    """The stage tables the report reads. `sources`: the tables the headline metrics come from
    (keyword scores, held-out IFT loss, each enabled judge), by `HeadlineMetric.source`."""

    sources: dict[str, pd.DataFrame]
    losses: pd.DataFrame
    probe: pd.DataFrame
    robustness: pd.DataFrame
    plan: dict[str, Any]
    trace: pd.DataFrame
    # The precision record of the hardware the completions came from (their provenance).
    hardware: dict[str, Any] | None = None
    # Each arm that trains by a module set -> its plan (the search's or a selector's).
    arm_sets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportTables:
    """The report's computed tables, each written to a CSV or shown in the Markdown."""

    rates: pd.DataFrame
    headline: pd.DataFrame
    main: pd.DataFrame
    per_benchmark: pd.DataFrame
    categories: pd.DataFrame
    verdicts: pd.DataFrame
    # Each control arm against the robust arm of its budget and gamma (`selector_comparison`).
    selectors: pd.DataFrame = field(default_factory=pd.DataFrame)


def read_sources(
    scores: list[Path], judged: list[Path], ift_losses: list[Path]
) -> dict[str, pd.DataFrame]:
    """The tables the headline metrics come from: keyword scores, held-out IFT loss, and each
    judge's verdicts (split by judge)."""
    sources = {"keyword": pd.concat([pd.read_parquet(p) for p in scores], ignore_index=True)}
    if ift_losses:
        sources["ift_loss"] = pd.concat([pd.read_parquet(p) for p in ift_losses])
    verdicts = [pd.read_parquet(p) for p in judged]
    for name in JUDGES:
        parts = [t for t in verdicts if not t.empty and t["judge"].iloc[0] == name]
        if parts:
            sources[name] = pd.concat(parts, ignore_index=True)
    return sources


def with_replicates(table: pd.DataFrame, replicate_of: dict[str, list]) -> pd.DataFrame:
    """The table with a `replicate` column, a replicate's rows (arm `<arm>_r<k>`) read as its
    arm's replicate k: every interval then resamples replicates before prompts."""
    out = table.copy()
    out["replicate"] = [replicate_of.get(a, [a, 0])[1] for a in out["arm"]]
    out["arm"] = [replicate_of.get(a, [a, 0])[0] for a in out["arm"]]
    return out


def read_inputs(
    *,
    scores: list[Path],
    judged: list[Path],
    losses: list[Path],
    ift_losses: list[Path],
    probe: Path,
    robustness: Path,
    plan: Path,
    trace: Path,
    selection_plans: list[Path] = (),  # type: ignore[assignment]
    settings: ReportSettings | None = None,
) -> ReportInputs:
    """Read every input table; the judged tables are split by judge (guard, llm), and the
    replicates of an arm become its rows (with a `replicate` column)."""
    replicate_of = settings.replicate_of if settings else {}
    sources = {
        name: with_replicates(table, replicate_of)
        for name, table in read_sources(scores, judged, ift_losses).items()
    }
    plans = {str(p): json.loads(p.read_text()) for p in [plan, *selection_plans]}
    arm_plans = settings.arm_plans if settings else {}
    return ReportInputs(
        sources=sources,
        losses=with_replicates(
            pd.concat([pd.read_parquet(p) for p in losses], ignore_index=True), replicate_of
        ),
        probe=pd.read_parquet(probe),
        robustness=pd.read_parquet(robustness),
        plan=plans[str(plan)],
        trace=pd.read_parquet(trace),
        hardware=read_provenance(scores[0]).get("precision") if scores else None,
        arm_sets={arm: plans[path] for arm, path in arm_plans.items() if path in plans},
    )


def compute_tables(inputs: ReportInputs, settings: ReportSettings) -> ReportTables:
    """The rates with their bootstrap CIs, the main table and the frontier verdicts."""
    n, level, seed = settings.bootstrap_samples, settings.confidence, settings.seed
    arm_order = list(settings.arm_order)
    sources = inputs.sources
    rates = summarise_scores(sources["keyword"], n, level, seed)
    headline = headline_rates(sources, n, level, seed, settings.alignment_benchmarks)
    main = tables.headline_table(headline, arm_order)
    per_benchmark = tables.main_table(rates, inputs.losses, arm_order)
    if "final_train_loss" in per_benchmark:
        main["final_train_loss"] = per_benchmark["final_train_loss"].to_numpy()
    ift_loss = sources.get("ift_loss", pd.DataFrame(columns=IFT_LOSS_COLUMNS))
    verdicts = frontier_verdicts(
        sources["keyword"], ift_loss, settings.arm_kinds, n, level, seed,
        settings.alignment_benchmarks,
    )  # fmt: skip
    return ReportTables(
        rates=rates,
        headline=headline,
        main=main,
        per_benchmark=per_benchmark,
        categories=(
            unsafe_rate_per_category(sources["guard"]) if "guard" in sources else pd.DataFrame()
        ),
        verdicts=verdicts,
        selectors=selector_comparison(
            sources["keyword"],
            ift_loss,
            settings.arm_kinds,
            settings.selector_pairs,
            n,
            level,
            seed,
            settings.alignment_benchmarks,
        ),  # fmt: skip
    )


def write_tables(report: ReportTables, probe: pd.DataFrame, outputs: dict[str, Path]) -> None:
    """The CSVs: every rate (headline first), the main and per-benchmark tables, the guard's
    hazard categories, the probe's accuracy."""
    tables.write_csv(
        pd.concat([report.headline, report.rates], ignore_index=True), outputs["rates"]
    )
    tables.write_csv(report.main, outputs["main_table"])
    tables.write_csv(report.per_benchmark, outputs["per_benchmark"])
    tables.write_csv(report.categories, outputs["guard_categories"])
    tables.write_csv(probe, outputs["probe_table"])
    tables.write_csv(report.verdicts, outputs["frontier_verdicts"])
    tables.write_csv(report.selectors, outputs["selector_comparison"])


def draw_figures(
    inputs: ReportInputs,
    headline: pd.DataFrame,
    arm_kinds: dict[str, str],
    outputs: dict[str, Path],
) -> None:
    """Every PNG: robustness heatmaps (score, then each metric) and depth profiles, the search
    trace, the probe's accuracy, the loss curves, the safety frontier."""
    figures.plot_robustness_heatmap(inputs.robustness, "score", outputs["heatmap"])
    for metric in METRICS:
        figures.plot_robustness_heatmap(inputs.robustness, metric, outputs[f"heatmap_{metric}"])
    figures.plot_robustness_by_depth(inputs.robustness, list(METRICS), outputs["by_depth"])
    floor = inputs.plan.get("accuracy_floor", inputs.plan["tau"])  # older plans: tau alone
    figures.plot_search_trace(inputs.trace, floor, outputs["search_trace"])
    figures.plot_probe_accuracy(inputs.probe, outputs["probe_plot"])
    figures.plot_loss_curves(inputs.losses, outputs["loss_curves"])
    figures.plot_safety_frontier(headline, arm_kinds, outputs["frontier"])


def report_markdown(inputs: ReportInputs, report: ReportTables, settings: ReportSettings) -> str:
    """The Markdown report: its sections in reading order, the figures linked by file name."""
    judged = {name: inputs.sources[name] for name in JUDGES if name in inputs.sources}
    sections = [
        f"# securetune report: domain {settings.domain} (IFT on {settings.ift_source})",
        tables.precision_section(inputs.hardware, settings.precision),
        tables.main_section(report.main, judged, settings.confidence),
        tables.per_benchmark_section(report.per_benchmark),
        tables.frontier_section(report.verdicts),
        tables.loss_section(),
        tables.probe_section(inputs.probe),
        tables.robustness_section(inputs.robustness, settings.score),
        tables.ranking_stability_section(inputs.robustness, inputs.plan),
        tables.plan_section(inputs.plan, inputs.trace),
        tables.module_sets_section(inputs.arm_sets),
        tables.selector_section(report.selectors, settings.confidence),
    ]
    return "\n\n".join(sections) + "\n"


def build_report(
    *,
    scores: list[Path],
    judged: list[Path],
    losses: list[Path],
    ift_losses: list[Path],
    probe: Path,
    robustness: Path,
    plan: Path,
    trace: Path,
    outputs: dict[str, Path],
    settings: ReportSettings,
    selection_plans: list[Path] = (),  # type: ignore[assignment]
) -> None:
    """Write the Markdown report, its CSV tables and PNG figures to `outputs` (the rule's named
    outputs) from the stage tables: scores, judge verdicts, training and held-out losses, the
    probe's accuracy, the robustness table, the search plan and its trace."""
    log.info("report settings: %s", settings)
    inputs = read_inputs(
        scores=scores,
        judged=judged,
        losses=losses,
        ift_losses=ift_losses,
        probe=probe,
        robustness=robustness,
        plan=plan,
        trace=trace,
        selection_plans=selection_plans,
        settings=settings,
    )
    report = compute_tables(inputs, settings)
    write_tables(report, inputs.probe, outputs)
    draw_figures(inputs, report.headline, settings.arm_kinds, outputs)
    write_paper_tables(inputs, report, settings, outputs)
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(report_markdown(inputs, report, settings))


def write_paper_tables(
    inputs: ReportInputs, report: ReportTables, settings: ReportSettings, outputs: dict[str, Path]
) -> None:
    """results/<domain>/report/paper_tables.csv: this domain's rows of the paper tables
    (`report.paper_tables`); `paper_tables` below puts every domain's on one page."""

    def paired(metric: str) -> tuple[float, float, float]:
        return paired_difference(
            inputs.sources, metric, "ml_lr", "vanilla",
            settings.bootstrap_samples, settings.confidence, settings.seed,
            settings.alignment_benchmarks,
        )  # fmt: skip

    csv = domain_tables(
        report.headline, list(settings.arm_order), settings.arm_kinds, settings.domain,
        settings.ift_source, settings.task_metric, settings.source_model, paired,
    )  # fmt: skip
    tables.write_csv(csv, outputs["paper_tables_csv"])


def gamma_ablation(
    *,
    scores: list[Path],
    judged: list[Path],
    ift_losses: list[Path],
    out: Path,
    settings: GammaAblationSettings,
) -> None:
    """results/<domain>/report/ablation_gamma.csv: the gamma sweep's arms on the headline
    metrics, with their bootstrap CIs, in increasing gamma."""
    log.info("gamma ablation settings: %s", settings)
    s = settings
    headline = headline_rates(
        read_sources(scores, judged, ift_losses),
        s.bootstrap_samples, s.confidence, s.seed, s.alignment_benchmarks,
    )  # fmt: skip
    tables.write_csv(gamma_table(headline, s.arm_gamma, s.domain, s.task_metric), out)


def paper_tables(
    *,
    domain_csvs: list[Path],
    gamma_csvs: list[Path],
    probe: Path,
    out_md: Path,
    out_csv: Path,
    source_model: str,
    confidence: float,
) -> None:
    """results/report/paper_tables.md and .csv: every domain's rows (in config order) in the
    paper's layout with its gamma ablation (when the config has a sweep), and the probe table
    the domains share."""
    csv = combine_domains([read_domain_csv(p) for p in domain_csvs])
    tables.write_csv(csv, out_csv)
    gamma = pd.concat([pd.read_csv(p) for p in gamma_csvs]) if gamma_csvs else None
    page = markdown(csv, pd.read_parquet(probe), source_model, confidence, gamma)
    with atomic_path(out_md) as tmp:
        tmp.write_text(page)
