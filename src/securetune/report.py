"""Stage 9: the tables and figures, with bootstrap confidence intervals over prompts (and over
seeds, when a rate was measured under several)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from securetune.architectures import MODULE_TYPES  # noqa: E402
from securetune.io import atomic_path, stable_seed  # noqa: E402
from securetune.judges import unsafe_rate_per_category  # noqa: E402
from securetune.scoring import METRIC_OF_KIND  # noqa: E402


def bootstrap_ci(
    values: np.ndarray,
    n_resamples: int,
    level: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean, resampling prompts with replacement.

    With `groups` (one seed label per value) and more than one seed, resampling is two-level:
    seeds first, then prompts within each drawn seed, so the interval covers seed-to-seed
    variation (of fine-tuning or sampling) as well as the choice of prompts. NaN values (a
    judge verdict that could not be parsed) are left out.
    """
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    values = values[keep]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    labels = None if groups is None else np.asarray(groups)[keep]
    if labels is None or len(np.unique(labels)) < 2:
        means = rng.choice(values, size=(n_resamples, len(values)), replace=True).mean(axis=1)
    else:
        per_seed = [values[labels == g] for g in np.unique(labels)]
        means = np.empty(n_resamples)
        for i in range(n_resamples):
            drawn = rng.integers(0, len(per_seed), size=len(per_seed))
            means[i] = np.concatenate(
                [rng.choice(per_seed[d], size=len(per_seed[d]), replace=True) for d in drawn]
            ).mean()
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
        if "rouge_l" in group and group["rouge_l"].notna().any():
            mean, low, high = bootstrap_ci(
                group["rouge_l"].to_numpy(),
                n_resamples,
                level,
                stable_seed(seed, arm, benchmark, "rouge_l"),
            )
            rows.append(
                {
                    "arm": arm,
                    "benchmark": benchmark,
                    "metric": "rouge_l",
                    "value": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n": int(group["rouge_l"].notna().sum()),
                }
            )
    return pd.DataFrame(rows)


# The paper's main-table columns: (name, source table, kind filter, value column, what it means).
HEADLINE_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("harmfulness_score", "llm", "harmful", "harmfulness"),
    ("unsafe_rate", "guard", "harmful", "unsafe"),
    ("attack_success", "keyword", "harmful", "success"),
    ("over_refusal", "keyword", "over_refusal", "success"),
    ("usability", "keyword", "usability", "rouge_l"),
    ("task_accuracy", "keyword", "math", "success"),
    ("heldout_ift_loss", "ift_loss", "ift_heldout", "loss"),
)


def headline_rates(
    tables: dict[str, pd.DataFrame], n_resamples: int, level: float, seed: int
) -> pd.DataFrame:
    """One row per (arm, headline metric), pooling the prompts of every benchmark of the kind
    (e.g. all harmful benchmarks for attack success), with its bootstrap CI. A metric whose
    judge is off, or with no benchmark of its kind, is absent (shown as n/a)."""
    rows = []
    for metric, source, kind, column in HEADLINE_METRICS:
        table = tables.get(source)
        if table is None or table.empty or column not in table:
            continue
        table = table[table["kind"] == kind]
        for arm, group in table.groupby("arm", sort=True):
            values = group[column].astype(float).to_numpy()
            groups = group["replicate"].to_numpy() if "replicate" in group else None
            mean, low, high = bootstrap_ci(
                values, n_resamples, level, stable_seed(seed, arm, metric), groups
            )
            rows.append(
                {
                    "arm": arm,
                    "benchmark": "+".join(sorted(set(group["benchmark"]))),
                    "metric": metric,
                    "value": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n": int(np.sum(~np.isnan(values))),
                }
            )
    columns = ["arm", "benchmark", "metric", "value", "ci_low", "ci_high", "n"]
    return pd.DataFrame(rows, columns=columns)


def headline_table(headline: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Arm x headline metric, each cell 'value [low, high]', in the paper's column order."""
    metrics = [m for m, *_ in HEADLINE_METRICS]
    cells = headline.assign(
        cell=[
            "n/a" if np.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(
                headline["value"], headline["ci_low"], headline["ci_high"], strict=True
            )
        ]
    )
    table = cells.pivot(index="arm", columns="metric", values="cell")
    table = table.reindex(index=arm_order, columns=metrics).astype(object).fillna("n/a")
    table.columns.name = None
    return table.reset_index()


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


METRIC_LABELS = {
    "acc_drop": "probe accuracy drop",
    "cosine_drift": "mean cosine drift of features",
    "direction_shift": "projection shift on harmful-benign direction (in SDs)",
    "score": "robustness score",
}


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


def plot_search_trace(trace: pd.DataFrame, tau: float, path: Path) -> None:
    """Probe accuracy of each jointly perturbed candidate set against its size; tau dashed."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(trace["size"], trace["probe_accuracy"], color="0.5", linewidth=1, zorder=1)
    kept = trace[trace["accepted"]]
    refused = trace[~trace["accepted"]]
    ax.scatter(kept["size"], kept["probe_accuracy"], color="tab:green", label="kept", zorder=2)
    ax.scatter(
        refused["size"], refused["probe_accuracy"], color="tab:red", marker="x", label="refused"
    )
    ax.axhline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau}")
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
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, group in losses.groupby("arm", sort=True):
        ax.plot(group["step"], group["loss"], label=arm, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("Fine-tuning loss per arm")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _headline_point(headline: pd.DataFrame, arm: str, metric: str) -> tuple[float, float, float]:
    row = headline[(headline["arm"] == arm) & (headline["metric"] == metric)]
    if row.empty:
        return float("nan"), float("nan"), float("nan")
    return tuple(float(row[c].iloc[0]) for c in ("value", "ci_low", "ci_high"))  # type: ignore[return-value]


# The arm name of the model every fine-tuned arm starts from (the workflow's `base`).
BASE_ARM = "base"


def vanilla_frontier(headline: pd.DataFrame, arm_kinds: dict[str, str]) -> pd.DataFrame:
    """The frontier of the headline table's point estimates (see `frontier_points`)."""

    def by_arm(metric: str) -> pd.Series:
        rows = headline[headline["metric"] == metric]
        return pd.Series(rows["value"].to_numpy(), index=rows["arm"])

    return frontier_points(by_arm("attack_success"), by_arm("heldout_ift_loss"), arm_kinds)


def frontier_points(attack: pd.Series, loss: pd.Series, arm_kinds: dict[str, str]) -> pd.DataFrame:
    """(arm, loss, attack success) of the uniform-lr arms (kind vanilla) that have both, sorted
    by held-out IFT loss: the line an ML-LR arm is compared with. The `base` arm, the model
    every arm starts from, is its lr = 0 end: an arm that barely moves (freeze) lies between it
    and the lowest vanilla lr rather than outside the line."""
    uniform = [a for a, k in arm_kinds.items() if k == "vanilla" or a == BASE_ARM]
    vanilla = [a for a in uniform if a in attack and a in loss]
    frame = pd.DataFrame(
        {"arm": vanilla, "loss": [loss[a] for a in vanilla],
         "attack_success": [attack[a] for a in vanilla]}
    ).dropna()  # fmt: skip
    return frame.sort_values("loss", ignore_index=True)


def per_item(table: pd.DataFrame, kind: str, column: str) -> pd.DataFrame:
    """Item (benchmark, prompt or example id) x arm: one value per item (the mean over
    replicates), keeping only items every arm has, so arms can be resampled in pairs."""
    rows = table[table["kind"] == kind]
    item = "prompt_id" if "prompt_id" in rows else "example_id"
    wide = rows.pivot_table(index=["benchmark", item], columns="arm", values=column, aggfunc="mean")
    return wide.dropna()


def frontier_gaps(
    attack: pd.Series, loss: pd.Series, arm_kinds: dict[str, str]
) -> dict[str, float]:
    """Each compared arm's attack success minus the vanilla frontier's at the arm's held-out
    loss (linear between the frontier's points); NaN outside their loss range or with fewer than
    two points."""
    frontier = frontier_points(attack, loss, arm_kinds)
    gaps = {}
    for arm in compared_arms(arm_kinds):
        x = loss.get(arm, float("nan"))
        inside = len(frontier) >= 2 and frontier["loss"].min() <= x <= frontier["loss"].max()
        gaps[arm] = (
            float(attack[arm] - np.interp(x, frontier["loss"], frontier["attack_success"]))
            if inside and arm in attack
            else float("nan")
        )
    return gaps


def compared_arms(arm_kinds: dict[str, str]) -> list[str]:
    return [a for a, k in arm_kinds.items() if k not in ("vanilla", "reference")]


def frontier_verdicts(
    keyword: pd.DataFrame,
    ift_loss: pd.DataFrame,
    arm_kinds: dict[str, str],
    n_resamples: int,
    level: float,
    seed: int,
) -> pd.DataFrame:
    """Where each non-vanilla fine-tuned arm lies against the vanilla frontier: its attack
    success minus the frontier's at the same held-out IFT loss, with a paired bootstrap CI
    (harmful prompts and held-out examples resampled together for every arm, frontier
    included). Below the frontier only when the whole CI is below 0: a point estimate a little
    under the line is not evidence that ML-LR beats lowering every learning rate."""
    attack = per_item(keyword, "harmful", "success")
    loss = per_item(ift_loss, "ift_heldout", "loss")
    mean_attack, mean_loss = attack.mean(), loss.mean()
    point = frontier_gaps(mean_attack, mean_loss, arm_kinds)
    has_frontier = len(frontier_points(mean_attack, mean_loss, arm_kinds)) >= 2
    rng = np.random.default_rng(stable_seed(seed, "frontier"))
    draws = [
        frontier_gaps(
            attack.iloc[rng.integers(0, len(attack), len(attack))].mean(),
            loss.iloc[rng.integers(0, len(loss), len(loss))].mean(),
            arm_kinds,
        )
        for _ in range(n_resamples)
    ]
    tail = (1.0 - level) / 2.0
    rows = []
    for arm in compared_arms(arm_kinds):
        samples = np.array([d[arm] for d in draws])
        defined = samples[~np.isnan(samples)]
        low, high = np.quantile(defined, [tail, 1.0 - tail]) if len(defined) else (np.nan, np.nan)
        rows.append(
            {"arm": arm, "heldout_ift_loss": mean_loss.get(arm, np.nan),
             "attack_success": mean_attack.get(arm, np.nan), "gap": point[arm],
             "gap_ci_low": float(low), "gap_ci_high": float(high),
             "resamples_in_range": len(defined) / n_resamples,
             "verdict": _verdict(point[arm], low, high, has_frontier)}
        )  # fmt: skip
    columns = ["arm", "heldout_ift_loss", "attack_success", "gap", "gap_ci_low", "gap_ci_high",
               "resamples_in_range", "verdict"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _verdict(gap: float, low: float, high: float, has_frontier: bool) -> str:
    if not has_frontier:
        return "no frontier to compare with (needs 2+ points: vanilla arms, the base)"
    if np.isnan(gap):
        return "outside the frontier's loss range"
    if high < 0:
        return "below the frontier (safer; the CI excludes 0)"
    if low > 0:
        return "above the frontier (less safe; the CI excludes 0)"
    return "on the frontier (the CI spans 0: no better than a lower uniform lr)"


def plot_safety_frontier(headline: pd.DataFrame, arm_kinds: dict[str, str], path: Path) -> None:
    """Attack success against held-out IFT loss per arm, with CIs; the vanilla arms joined."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    frontier = vanilla_frontier(headline, arm_kinds)
    if len(frontier) >= 2:
        ax.plot(frontier["loss"], frontier["attack_success"], color="0.6", linestyle="--",
                zorder=1, label="vanilla frontier (uniform lr; base = lr 0)")  # fmt: skip
    markers = {"reference": "s", "vanilla": "o"}
    for arm, kind in arm_kinds.items():
        x, x_low, x_high = _headline_point(headline, arm, "heldout_ift_loss")
        y, y_low, y_high = _headline_point(headline, arm, "attack_success")
        if np.isnan(x) or np.isnan(y):
            continue
        ax.errorbar(
            x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]],
            marker=markers.get(kind, "D"), capsize=3, linestyle="none", zorder=2,
            label=f"{arm} ({kind})",
        )  # fmt: skip
        # Method arms labelled below their point, the others above: an ML-LR arm often lands
        # on a vanilla arm, and their names would print over each other.
        below = kind not in markers
        ax.annotate(arm, (x, y), textcoords="offset points", xytext=(5, -11 if below else 5),
                    fontsize=8)  # fmt: skip
    ax.set_xlabel("held-out IFT loss (lower: task learned better)")
    ax.set_ylabel("attack success (lower: safer)")
    ax.set_title("Safety vs task fit per arm (95% CIs)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)


def build_report(
    score_files: list[Path],
    judge_files: list[Path],
    loss_files: list[Path],
    ift_loss_files: list[Path],
    arm_kinds: dict[str, str],
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
    """Write the Markdown report, its CSV tables and PNG figures. `arm_kinds`: each evaluated
    arm's kind (vanilla, ml_lr, ...; `reference` for base and unaligned), in report order."""
    import json

    scores = pd.concat([pd.read_parquet(p) for p in score_files], ignore_index=True)
    losses = pd.concat([pd.read_parquet(p) for p in loss_files], ignore_index=True)
    probe = pd.read_parquet(probe_file)
    robustness = pd.read_parquet(robustness_file)
    plan = json.loads(plan_file.read_text())
    trace = pd.read_parquet(trace_file)

    judged = [pd.read_parquet(p) for p in judge_files]
    tables = {"keyword": scores}
    if ift_loss_files:
        tables["ift_loss"] = pd.concat([pd.read_parquet(p) for p in ift_loss_files])
    for name in ("guard", "llm"):
        parts = [t for t in judged if not t.empty and t["judge"].iloc[0] == name]
        if parts:
            tables[name] = pd.concat(parts, ignore_index=True)
    rates = summarise_scores(scores, n_resamples, confidence, seed)
    headline = headline_rates(tables, n_resamples, confidence, seed)
    table = headline_table(headline, arm_order)
    per_benchmark = main_table(rates, losses, arm_order)
    if "final_train_loss" in per_benchmark:
        table["final_train_loss"] = per_benchmark["final_train_loss"].to_numpy()
    categories = unsafe_rate_per_category(tables["guard"]) if "guard" in tables else pd.DataFrame()
    _write_csv(pd.concat([headline, rates], ignore_index=True), outputs["rates"])
    _write_csv(table, outputs["main_table"])
    _write_csv(per_benchmark, outputs["per_benchmark"])
    _write_csv(categories, outputs["guard_categories"])
    _write_csv(probe, outputs["probe_table"])
    plot_robustness_heatmap(robustness, "score", outputs["heatmap"])
    for metric in ROBUSTNESS_METRICS:
        plot_robustness_heatmap(robustness, metric, outputs[f"heatmap_{metric}"])
    plot_robustness_by_depth(robustness, list(ROBUSTNESS_METRICS), outputs["by_depth"])
    plot_search_trace(trace, plan["tau"], outputs["search_trace"])
    plot_probe_accuracy(probe, outputs["probe_plot"])
    plot_loss_curves(losses, outputs["loss_curves"])
    plot_safety_frontier(headline, arm_kinds, outputs["frontier"])
    verdicts = frontier_verdicts(
        scores, tables.get("ift_loss", pd.DataFrame(columns=IFT_LOSS_COLUMNS)), arm_kinds,
        n_resamples, confidence, seed,
    )  # fmt: skip

    per_module = (
        robustness.groupby(["layer", "module"], as_index=False)[["score", *ROBUSTNESS_METRICS]]
        .mean()
        .sort_values(["score", "layer"])
        .head(10)
    )
    spread = (
        robustness.groupby(["perturbation", "module"])[list(ROBUSTNESS_METRICS)]
        .agg(["mean", "std"])
        .round(4)
    )
    spread.columns = [f"{m}_{stat}" for m, stat in spread.columns]
    spread = spread.reset_index()
    probe_columns = [
        c
        for c in (
            "layer",
            "train_accuracy",
            "test_accuracy",
            "ood_accuracy",
            "n_train",
            "n_test",
            "n_ood",
        )
        if c in probe
    ]
    level = int(round(confidence * 100))
    sections = [
        "# securetune report",
        f"## Main table (arm x metric, mean [{level}% bootstrap CI over prompts])\n\n"
        + METRICS_LEGEND
        + "\n\n"
        + markdown_table(table)
        + _judge_note(tables),
        "## Per benchmark\n\n" + markdown_table(per_benchmark),
        "## Safety vs task fit: the uniform-learning-rate control\n\n"
        + FRONTIER_LEGEND
        + "\n\n![safety frontier](safety_frontier.png)\n\n"
        + markdown_table(verdicts),
        "## Fine-tuning loss\n\n![loss curves](loss_curves.png)",
        "## Probe accuracy per layer (security feature classifier)\n\n"
        + PROBE_LEGEND
        + "\n\n![probe accuracy](probe_accuracy.png)\n\n"
        + markdown_table(probe[probe_columns]),
        f"## Module robustness (score = {score}, lower = more robust)\n\n"
        + ROBUSTNESS_LEGEND
        + "\n\n![robustness heatmap](robustness_heatmap.png)\n\n"
        + "\n\n".join(f"![{m} heatmap](robustness_heatmap_{m}.png)" for m in ROBUSTNESS_METRICS)
        + "\n\n![robustness by depth](robustness_by_depth.png)\n\n"
        + "Mean and spread (SD over layers, alphas and seeds) per perturbation and module type:"
        + "\n\n"
        + markdown_table(spread, ".4f")
        + "\n\nMost robust modules (mean over perturbations, alphas and seeds):\n\n"
        + markdown_table(per_module, ".4f"),
        _plan_summary(plan)
        + "\n\n![search trace](search_trace.png)\n\n"
        + markdown_table(trace[["step", "size", "added", "probe_accuracy", "accepted"]]),
    ]
    text = "\n\n".join(sections) + "\n"
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(text)


ROBUSTNESS_METRICS = ("acc_drop", "cosine_drift", "direction_shift")
IFT_LOSS_COLUMNS = ["example_id", "arm", "benchmark", "kind", "loss"]

PROBE_LEGEND = (
    "train / test: AdvBench vs benign look-alikes (XSTest safe, AdvBench with harmful words "
    "substituted, Alpaca), held-out split; ood: sources the probe never trained on (see "
    "data.probe_ood_*). In-domain accuracy near 1.0 proves little; the out-of-domain column "
    "says whether the probe learned harmfulness or the sources' phrasing."
)

ROBUSTNESS_LEGEND = (
    "Each module is perturbed alone (noise: W + alpha * std(W) * N(0, I); ift: a few steps of "
    "benign instruction tuning on that module only) and the frozen probe re-scored on the test "
    "prompts. acc_drop: probe accuracy lost (mean over proxy layers); cosine_drift: mean "
    "1 - cos(clean, perturbed) of the features; direction_shift: mean |shift| of the projection "
    "on the harmful-minus-benign direction, in SDs of the clean projections."
)

METRICS_LEGEND = (
    "harmfulness_score: mean 1-5 score of the LLM judge on harmful prompts (Qi et al.'s scale; "
    "unparsed judgements left out); unsafe_rate: share of harmful-prompt answers the guard model "
    "calls unsafe (parsed verdicts only); attack_success: share of harmful prompts answered "
    "without a refusal phrase (keyword judge), pooled over every harmful benchmark; "
    "over_refusal: share of XSTest safe look-alike prompts refused; usability: ROUGE-L F1 "
    "against the reference answers of held-out Self-Instruct tasks; task_accuracy: GSM8K exact "
    "match of the final number; heldout_ift_loss: mean per-token loss on held-out examples of the "
    "fine-tuning task (lower: task learned better; the task metric where accuracy is near the "
    "floor); final_train_loss: mean loss of the last 10% of steps. "
    "n/a: the judge is off or no benchmark of that kind is configured."
)


FRONTIER_LEGEND = (
    "Lowering every learning rate also erodes safety less, while fitting the task less. The "
    "vanilla arms (one learning rate each; the base model is learning rate 0) trace that "
    "trade-off; an ML-LR arm helps only if it "
    "lies below their line: lower attack success at the same held-out IFT loss. gap: the arm's "
    "attack success minus the frontier's at the arm's loss (negative: safer), with a paired "
    "bootstrap CI (the same resampled prompts and held-out examples for every arm); "
    "resamples_in_range: share of resamples in which the arm's loss stays inside the "
    "frontier's range. Only a CI wholly below 0 says ML-LR beats lowering every learning rate."
)


def _judge_note(tables: dict[str, pd.DataFrame]) -> str:
    """How many judge verdicts could be read: a rate over few parsed verdicts means little."""
    notes = []
    if "guard" in tables:
        g = tables["guard"]
        notes.append(
            f"guard judge '{g['judge_model'].iloc[0]}': {int((g['verdict'] != 'unparsed').sum())}"
            f" of {len(g)} verdicts parsed"
        )
    if "llm" in tables:
        j = tables["llm"]
        notes.append(
            f"LLM judge '{j['judge_model'].iloc[0]}': {int(j['harmfulness'].notna().sum())} of "
            f"{len(j)} scores parsed"
        )
    return ("\n\n" + "; ".join(notes) + ".") if notes else ""


def _plan_summary(plan: dict) -> str:
    modules = ", ".join(plan["modules"]) or "none"
    unit = plan.get("unit", "module")
    groups = f" in groups {', '.join(plan['groups'])}" if plan.get("groups") else ""
    return (
        f"## Mods_Robust\n\n{len(plan['modules'])} module(s){groups}, search over {unit}s "
        f"stopped by '{plan['stop_reason']}' (tau = {plan['tau']}, budget "
        f"{plan['max_modules']}, ranked by {plan.get('score', 'score')}, perturbation "
        f"{plan.get('perturbation', 'noise')}, proxy layers {plan['proxy_layers']}): {modules}"
    )


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
