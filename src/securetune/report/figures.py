"""The report's PNG figures (matplotlib, Agg backend: no display on a cluster node). Saved
without the Software tag, so the same numbers give the same bytes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from securetune.architectures import MODULE_TYPES  # noqa: E402
from securetune.io import atomic_path  # noqa: E402
from securetune.method import REFERENCE_KIND  # noqa: E402
from securetune.report.stats import (  # noqa: E402
    VANILLA_KIND,
    headline_point,
    monotone_frontier,
    vanilla_frontier,
)

METRIC_LABELS = {
    "acc_drop": "probe accuracy drop",
    "cosine_drift": "mean cosine drift of features",
    "direction_shift": "projection shift on harmful-benign direction (in SDs)",
    "score": "robustness score",
}
# The frontier plot's markers: reference models and uniform-lr arms; the method's arms "D".
FRONTIER_MARKERS = {REFERENCE_KIND: "s", VANILLA_KIND: "o"}


def _module_grid(robustness: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Module type x layer, mean over seeds and alphas of `metric`."""
    return (
        robustness.groupby(["module", "layer"])[metric]
        .mean()
        .unstack("layer")
        .reindex([m for m in MODULE_TYPES if m in set(robustness["module"])])
    )


def plot_robustness_heatmap(robustness: pd.DataFrame, metric: str, path: Path) -> None:
    """Module type x layer heatmap of `metric` (mean over seeds and alphas; lower = more
    robust), one panel per perturbation, each with its own colour bar."""
    perturbations = sorted(robustness["perturbation"].unique())
    n_layers = robustness["layer"].nunique()
    width = max(5.5, 0.32 * n_layers + 3.0)
    fig, axes = plt.subplots(
        len(perturbations), 1, figsize=(width, 2.9 * len(perturbations)), squeeze=False
    )
    for ax, perturbation in zip(axes[:, 0], perturbations, strict=True):
        grid = _module_grid(robustness[robustness["perturbation"] == perturbation], metric)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
        step = max(1, n_layers // 16)  # at most ~16 layer ticks stay readable
        ticks = list(range(0, grid.shape[1], step))
        ax.set_xticks(ticks, [str(grid.columns[i]) for i in ticks])
        ax.set_yticks(range(grid.shape[0]), list(grid.index))
        ax.set_xlabel("layer")
        ax.set_ylabel("module type")
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)}: {perturbation} perturbation")
        fig.colorbar(image, ax=ax, label=f"{metric} (lower = more robust)")
    fig.tight_layout()
    _save(fig, path)


def plot_robustness_by_depth(robustness: pd.DataFrame, metrics: list[str], path: Path) -> None:
    """One panel per (metric, perturbation): the metric against layer, a line per module type,
    shaded +- 1 SD over seeds and alphas."""
    perturbations = sorted(robustness["perturbation"].unique())
    fig, axes = plt.subplots(
        len(metrics),
        len(perturbations),
        figsize=(5.2 * len(perturbations), 2.8 * len(metrics)),
        squeeze=False,
        sharex=True,
    )
    colours = plt.get_cmap("tab10")
    for row, metric in enumerate(metrics):
        for col, perturbation in enumerate(perturbations):
            ax = axes[row, col]
            part = robustness[robustness["perturbation"] == perturbation]
            stats = part.groupby(["module", "layer"])[metric].agg(["mean", "std"]).fillna(0.0)
            for i, module in enumerate(m for m in MODULE_TYPES if m in set(part["module"])):
                line = stats.loc[module]
                ax.plot(line.index, line["mean"], marker="o", ms=3, color=colours(i), label=module)
                ax.fill_between(
                    line.index,
                    line["mean"] - line["std"],
                    line["mean"] + line["std"],
                    color=colours(i),
                    alpha=0.15,
                )
            ax.set_title(f"{perturbation}: {METRIC_LABELS.get(metric, metric)}", fontsize=9)
            ax.set_ylabel(metric)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == len(metrics) - 1:
                ax.set_xlabel("layer")
    axes[0, -1].legend(title="module", fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_search_trace(trace: pd.DataFrame, floor: float, path: Path) -> None:
    """Probe accuracy of each jointly perturbed candidate set against its size; the accuracy
    floor the sets were held to (tau, or the clean accuracy less tau_drop) dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(trace["size"], trace["probe_accuracy"], color="0.5", linewidth=1, zorder=1)
    kept = trace[trace["accepted"]]
    refused = trace[~trace["accepted"]]
    ax.scatter(kept["size"], kept["probe_accuracy"], color="tab:green", label="kept", zorder=2)
    ax.scatter(
        refused["size"], refused["probe_accuracy"], color="tab:red", marker="x", label="refused"
    )
    ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"floor = {floor:.3f}")
    ax.set_xlabel("size of the candidate set (modules)")
    ax.set_ylabel("probe accuracy, set perturbed jointly")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Greedy search for Mods_Robust")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_probe_accuracy(probe: pd.DataFrame, path: Path) -> None:
    """Probe accuracy per layer: train, held-out in-domain and out-of-domain."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for column, label in (
        ("train_accuracy", "train"),
        ("test_accuracy", "test (in-domain)"),
        ("ood_accuracy", "test (out-of-domain)"),
    ):
        if column in probe and probe[column].notna().any():
            ax.plot(probe["layer"], probe[column], marker="o", ms=3, label=label)
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Security feature classifier (probe) per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_loss_curves(losses: pd.DataFrame, path: Path) -> None:
    """Training loss against step, one line per fine-tuned arm (and replicate, in the arm's
    colour, labelled once)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if "replicate" not in losses:
        losses = losses.assign(replicate=0)
    for i, (arm, group) in enumerate(losses.groupby("arm", sort=True)):
        for k, (_, run) in enumerate(group.groupby("replicate", sort=True)):
            ax.plot(run["step"], run["loss"], color=f"C{i % 10}", linewidth=1.2,
                    alpha=1.0 if k == 0 else 0.5, label=arm if k == 0 else None)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Fine-tuning loss per arm")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_safety_frontier(headline: pd.DataFrame, arm_kinds: dict[str, str], path: Path) -> None:
    """Attack success against held-out IFT loss per arm, with CIs; the vanilla arms joined by
    the verdict's monotone curve (and, fainter, by the straight lines of `gap_linear`)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _draw_frontier(ax, vanilla_frontier(headline, arm_kinds))
    for arm, kind in arm_kinds.items():
        x, x_low, x_high = headline_point(headline, arm, "heldout_ift_loss")
        y, y_low, y_high = headline_point(headline, arm, "attack_success")
        if np.isnan(x) or np.isnan(y):
            continue
        ax.errorbar(
            x, y, xerr=_extent(x, x_low, x_high), yerr=_extent(y, y_low, y_high),
            marker=FRONTIER_MARKERS.get(kind, "D"), capsize=3, linestyle="none", zorder=2,
            label=f"{arm} ({kind})",
        )  # fmt: skip
        # Method arms labelled below their point, the others above: an ML-LR arm often lands
        # on a vanilla arm, and their names would print over each other.
        below = kind not in FRONTIER_MARKERS
        ax.annotate(arm, (x, y), textcoords="offset points", xytext=(5, -11 if below else 5),
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("held-out IFT loss (lower: task learned better)")
    ax.set_ylabel("attack success (lower: safer)")
    ax.set_title("Safety vs task fit per arm (95% CIs)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _extent(value: float, low: float, high: float) -> list[list[float]]:
    """An error bar's lengths below and above the point (never negative: matplotlib refuses
    them, and an interval may end a rounding error past its point)."""
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def _draw_frontier(ax: plt.Axes, frontier: pd.DataFrame) -> None:
    """The frontier the verdicts use (`stats.monotone_frontier`) over its loss range, with the
    straight lines between its points: where they part, an arm between points is judged
    differently by the two gaps."""
    if frontier["loss"].nunique() < 2:
        return
    x, y = frontier["loss"].to_numpy(), frontier["attack_success"].to_numpy()
    grid = np.linspace(x[0], x[-1], 200)
    ax.plot(grid, monotone_frontier(x, y)(grid), color="0.4", linestyle="--", zorder=1,
            label="vanilla frontier, monotone (uniform lr; base = lr 0)")  # fmt: skip
    ax.plot(x, y, color="0.75", linestyle=":", zorder=1, label="straight lines (gap_linear)")


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)
