"""Stage 9: the tables and figures, with bootstrap confidence intervals over prompts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from securetune.architectures import MODULE_TYPES  # noqa: E402
from securetune.io import atomic_path, stable_seed  # noqa: E402
from securetune.scoring import METRIC_OF_KIND  # noqa: E402


def bootstrap_ci(
    values: np.ndarray, n_resamples: int, level: float, seed: int
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean, resampling prompts with replacement."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_resamples, len(values)), replace=True).mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def summarise_scores(
    scores: pd.DataFrame, n_resamples: int, level: float, seed: int
) -> pd.DataFrame:
    """One row per (arm, benchmark): the headline rate with its CI."""
    rows = []
    for (arm, benchmark, kind), group in scores.groupby(["arm", "benchmark", "kind"], sort=True):
        mean, low, high = bootstrap_ci(
            group["success"].to_numpy(), n_resamples, level, stable_seed(seed, arm, benchmark)
        )
        rows.append(
            {
                "arm": arm,
                "benchmark": benchmark,
                "metric": METRIC_OF_KIND[kind],
                "value": mean,
                "ci_low": low,
                "ci_high": high,
                "n": len(group),
            }
        )
    return pd.DataFrame(rows)


def main_table(summary: pd.DataFrame, losses: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Arm x metric, the paper's shape: each cell 'value [low, high]', plus final train loss."""
    summary = summary.assign(column=summary["metric"] + ":" + summary["benchmark"])
    cells = summary.assign(
        cell=[
            f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(
                summary["value"], summary["ci_low"], summary["ci_high"], strict=True
            )
        ]
    )
    table = cells.pivot(index="arm", columns="column", values="cell")
    if not losses.empty:
        last = (
            losses.sort_values("step")
            .groupby("arm")["loss"]
            .apply(lambda s: s.tail(max(1, len(s) // 10)).mean())
        )
        table["final_train_loss"] = last.map(lambda v: f"{v:.4f}")
    table = table.reindex([a for a in arm_order if a in table.index]).fillna("n/a")
    return table.reset_index()


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-style Markdown table (no tabulate dependency needed)."""

    def fmt(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def plot_robustness_heatmap(robustness: pd.DataFrame, metric: str, path: Path) -> None:
    """Module type x layer, mean over seeds and alphas of `metric` (lower = more robust)."""
    grid = (
        robustness.groupby(["module", "layer"])[metric]
        .mean()
        .unstack("layer")
        .reindex([m for m in MODULE_TYPES if m in set(robustness["module"])])
    )
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * grid.shape[1] + 2.5), 3.6))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), list(grid.index))
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    ax.set_title(f"Module robustness: {metric} (lower = more robust)")
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    _save(fig, path)


def plot_loss_curves(losses: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, group in losses.groupby("arm", sort=True):
        ax.plot(group["step"], group["loss"], label=arm, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Fine-tuning loss per arm")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)


def build_report(
    score_files: list[Path],
    loss_files: list[Path],
    probe_file: Path,
    robustness_file: Path,
    plan_file: Path,
    trace_file: Path,
    outputs: dict[str, Path],
    arm_order: list[str],
    n_resamples: int,
    confidence: float,
    score: str,
    seed: int,
) -> None:
    """Write the Markdown report, its CSV tables and PNG figures."""
    import json

    scores = pd.concat([pd.read_parquet(p) for p in score_files], ignore_index=True)
    losses = pd.concat([pd.read_parquet(p) for p in loss_files], ignore_index=True)
    probe = pd.read_parquet(probe_file)
    robustness = pd.read_parquet(robustness_file)
    plan = json.loads(plan_file.read_text())
    trace = pd.read_parquet(trace_file)

    rates = summarise_scores(scores, n_resamples, confidence, seed)
    table = main_table(rates, losses, arm_order)
    _write_csv(rates, outputs["rates"])
    _write_csv(table, outputs["main_table"])
    _write_csv(probe, outputs["probe_table"])
    plot_robustness_heatmap(robustness, score, outputs["heatmap"])
    plot_loss_curves(losses, outputs["loss_curves"])

    per_module = (
        robustness.groupby(["layer", "module"], as_index=False)[score]
        .mean()
        .sort_values([score, "layer"])
        .head(10)
    )
    level = int(round(confidence * 100))
    sections = [
        "# securetune report",
        f"## Main table (arm x metric, mean [{level}% bootstrap CI over prompts])\n\n"
        + METRICS_LEGEND
        + "\n\n"
        + markdown_table(table),
        "## Fine-tuning loss\n\n![loss curves](loss_curves.png)",
        "## Probe accuracy per layer (security feature classifier)\n\n"
        + markdown_table(probe[["layer", "train_accuracy", "test_accuracy", "n_train", "n_test"]]),
        f"## Module robustness ({score}, lower = more robust)\n\n"
        "![robustness heatmap](robustness_heatmap.png)\n\nMost robust modules:\n\n"
        + markdown_table(per_module),
        _plan_summary(plan)
        + "\n\n"
        + markdown_table(trace[["step", "size", "added", "probe_accuracy", "accepted"]]),
    ]
    text = "\n\n".join(sections) + "\n"
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(text)


METRICS_LEGEND = (
    "attack_success: share of harmful prompts answered without a refusal phrase (keyword judge); "
    "over_refusal: share of safe look-alike prompts refused; accuracy: GSM8K exact match of the "
    "final number; final_train_loss: mean loss of the last 10% of steps."
)


def _plan_summary(plan: dict) -> str:
    modules = ", ".join(plan["modules"]) or "none"
    return (
        f"## Mods_Robust\n\n{len(plan['modules'])} module(s), search stopped by "
        f"'{plan['stop_reason']}' (tau = {plan['tau']}, budget {plan['max_modules']}, "
        f"proxy layers {plan['proxy_layers']}): {modules}"
    )


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
