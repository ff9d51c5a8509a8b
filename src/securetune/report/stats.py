"""The report's numbers: bootstrap intervals over prompts (and seeds), the headline rates, the
vanilla frontier and each ML-LR arm's gap to it, the robustness summaries. No plotting here."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from securetune.io import stable_seed
from securetune.method import ARM_KINDS, KINDS_WITH_PLAN, REFERENCE_ARMS, REFERENCE_KIND
from securetune.robustness_table import METRICS
from securetune.scoring import METRIC_OF_KIND

# The model every fine-tuned arm starts from (method.py names it first): the frontier's lr = 0.
BASE_ARM = REFERENCE_ARMS[0]
# The uniform-learning-rate kind, whose arms trace the frontier: the one kind of method.py that
# does not train by Mods_Robust (unpacking fails loudly should a second one appear).
(VANILLA_KIND,) = [kind for kind in ARM_KINDS if kind not in KINDS_WITH_PLAN]


class HeadlineMetric(NamedTuple):
    """A main-table column: which table it is read from and how."""

    name: str
    # The source table: keyword, guard, llm (judges) or ift_loss.
    source: str
    # The benchmark kind whose rows are pooled.
    kind: str
    # The per-row value averaged.
    column: str
    # Which benchmarks of the kind are pooled: `all`; `held_out`, those the alignment set took
    # no rows of; `in_alignment`, those it did (see `pooled_rows`).
    pool: str = "all"


# The paper's main-table columns, in its order. The harmful metrics pool only the benchmarks the
# alignment did not train on: its refusals were taught on other rows of the same source (AdvBench
# in the demo), so those prompts measure recall of the training distribution rather than safety
# on new requests, and are shown apart (attack_success_in_alignment).
HEADLINE_METRICS: tuple[HeadlineMetric, ...] = (
    HeadlineMetric("harmfulness_score", "llm", "harmful", "harmfulness", "held_out"),
    HeadlineMetric("unsafe_rate", "guard", "harmful", "unsafe", "held_out"),
    HeadlineMetric("attack_success", "keyword", "harmful", "success", "held_out"),
    HeadlineMetric("attack_success_in_alignment", "keyword", "harmful", "success", "in_alignment"),
    HeadlineMetric("over_refusal", "keyword", "over_refusal", "success"),
    HeadlineMetric("usability", "keyword", "usability", "rouge_l"),
    HeadlineMetric("task_accuracy", "keyword", "math", "success"),
    HeadlineMetric("heldout_ift_loss", "ift_loss", "ift_heldout", "loss"),
)
RATE_COLUMNS = ["arm", "benchmark", "metric", "value", "ci_low", "ci_high", "n"]
# The per-benchmark rate of the keyword scores' `success_lenient` column.
LENIENT_ATTACK_SUCCESS = "attack_success_lenient"


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


def _rate(
    arm: str, benchmark: str, metric: str, ci: tuple[float, float, float], n: int
) -> dict[str, object]:
    mean, low, high = ci
    return dict(zip(RATE_COLUMNS, (arm, benchmark, metric, mean, low, high, n), strict=True))


def summarise_scores(
    scores: pd.DataFrame, n_resamples: int, level: float, seed: int
) -> pd.DataFrame:
    """One row per (arm, benchmark): the headline rate with its CI, the lenient attack success
    beside the strict one on harmful benchmarks, and ROUGE-L where scored."""
    rows = []
    for (arm, benchmark, kind), group in scores.groupby(["arm", "benchmark", "kind"], sort=True):
        ci = bootstrap_ci(
            group["success"].to_numpy(), n_resamples, level, stable_seed(seed, arm, benchmark)
        )
        rows.append(_rate(arm, benchmark, METRIC_OF_KIND[kind], ci, len(group)))
        if kind == "harmful" and "success_lenient" in group:
            rows.append(_lenient_rate(group, arm, benchmark, n_resamples, level, seed))
        if "rouge_l" in group and group["rouge_l"].notna().any():
            ci = bootstrap_ci(
                group["rouge_l"].to_numpy(),
                n_resamples,
                level,
                stable_seed(seed, arm, benchmark, "rouge_l"),
            )
            rows.append(_rate(arm, benchmark, "rouge_l", ci, int(group["rouge_l"].notna().sum())))
    return pd.DataFrame(rows)


def _lenient_rate(
    group: pd.DataFrame, arm: str, benchmark: str, n_resamples: int, level: float, seed: int
) -> dict[str, object]:
    """The attack success of the judge before the audit (no refusal at the opening): its gap to
    the strict rate is the share of answers in the task's style, off topic or empty."""
    ci = bootstrap_ci(
        group["success_lenient"].to_numpy(dtype=float),
        n_resamples,
        level,
        stable_seed(seed, arm, benchmark, "lenient"),
    )
    return _rate(arm, benchmark, LENIENT_ATTACK_SUCCESS, ci, len(group))


def headline_metric(name: str) -> HeadlineMetric:
    """The headline metric of this name."""
    return next(m for m in HEADLINE_METRICS if m.name == name)


def pooled_rows(
    table: pd.DataFrame, metric: HeadlineMetric, alignment_benchmarks: tuple[str, ...]
) -> pd.DataFrame:
    """The rows a headline metric pools: its kind, then its `pool` of benchmarks, where
    `alignment_benchmarks` are those the alignment set took rows of (none when align is off,
    so `held_out` is then every benchmark of the kind)."""
    rows = table[table["kind"] == metric.kind]
    in_alignment = rows["benchmark"].isin(alignment_benchmarks)
    if metric.pool == "held_out":
        return rows[~in_alignment]
    if metric.pool == "in_alignment":
        return rows[in_alignment]
    return rows


def headline_rates(
    tables: dict[str, pd.DataFrame],
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...],
) -> pd.DataFrame:
    """One row per (arm, headline metric), pooling the prompts of the metric's benchmarks (e.g.
    the harmful ones not in the alignment set, for attack success), with its bootstrap CI. A
    metric whose judge is off, or with no benchmark to pool, is absent (shown as n/a)."""
    rows = []
    for metric in HEADLINE_METRICS:
        table = tables.get(metric.source)
        if table is None or table.empty or metric.column not in table:
            continue
        table = pooled_rows(table, metric, alignment_benchmarks)
        for arm, group in table.groupby("arm", sort=True):
            values = group[metric.column].astype(float).to_numpy()
            groups = group["replicate"].to_numpy() if "replicate" in group else None
            ci = bootstrap_ci(
                values, n_resamples, level, stable_seed(seed, arm, metric.name), groups
            )
            benchmark = "+".join(sorted(set(group["benchmark"])))
            n = int(np.sum(~np.isnan(values)))
            rows.append(_rate(arm, benchmark, metric.name, ci, n))
    return pd.DataFrame(rows, columns=RATE_COLUMNS)


def final_train_loss(losses: pd.DataFrame) -> pd.Series:
    """Per arm, the mean loss of the last 10% of steps (at least one): where training ended."""
    return (
        losses.sort_values("step")
        .groupby("arm")["loss"]
        .apply(lambda s: s.tail(max(1, len(s) // 10)).mean())
    )


def headline_point(headline: pd.DataFrame, arm: str, metric: str) -> tuple[float, float, float]:
    """(value, low, high) of one arm's headline metric; NaNs when it was not measured."""
    row = headline[(headline["arm"] == arm) & (headline["metric"] == metric)]
    if row.empty:
        return float("nan"), float("nan"), float("nan")
    return tuple(float(row[c].iloc[0]) for c in ("value", "ci_low", "ci_high"))  # type: ignore[return-value]


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
    uniform = [a for a, k in arm_kinds.items() if k == VANILLA_KIND or a == BASE_ARM]
    vanilla = [a for a in uniform if a in attack and a in loss]
    frame = pd.DataFrame(
        {"arm": vanilla, "loss": [loss[a] for a in vanilla],
         "attack_success": [attack[a] for a in vanilla]}
    ).dropna()  # fmt: skip
    return frame.sort_values("loss", ignore_index=True)


def per_item(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Item (benchmark, prompt or example id) x arm: one value per item (the mean over
    replicates), keeping only items every arm has, so arms can be resampled in pairs."""
    item = "prompt_id" if "prompt_id" in rows else "example_id"
    wide = rows.pivot_table(index=["benchmark", item], columns="arm", values=column, aggfunc="mean")
    return wide.dropna()


def paired_difference(
    tables: dict[str, pd.DataFrame],
    metric_name: str,
    arm: str,
    reference: str,
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...],
) -> tuple[float, float, float]:
    """(mean, low, high) of `arm` minus `reference` on a headline metric (over the same
    benchmarks as its headline rate), item by item: the two arms' values on the same prompts
    are resampled together, so the interval is the difference's own (narrower than two
    separate intervals suggest). NaN where either arm or the metric's table is missing."""
    metric = headline_metric(metric_name)
    table = tables.get(metric.source)
    if table is None or table.empty or metric.column not in table:
        return float("nan"), float("nan"), float("nan")
    wide = per_item(pooled_rows(table, metric, alignment_benchmarks), metric.column)
    if arm not in wide or reference not in wide:
        return float("nan"), float("nan"), float("nan")
    differences = (wide[arm] - wide[reference]).to_numpy(dtype=float)
    seed = stable_seed(seed, "paired", arm, reference, metric_name)
    return bootstrap_ci(differences, n_resamples, level, seed)


def compared_arms(arm_kinds: dict[str, str]) -> list[str]:
    """The arms set against the frontier: those neither uniform-lr nor reference models."""
    return [a for a, k in arm_kinds.items() if k not in (VANILLA_KIND, REFERENCE_KIND)]


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


def frontier_verdicts(
    keyword: pd.DataFrame,
    ift_loss: pd.DataFrame,
    arm_kinds: dict[str, str],
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...],
) -> pd.DataFrame:
    """Where each non-vanilla fine-tuned arm lies against the vanilla frontier: its attack
    success (the headline's: harmful benchmarks not in the alignment set) minus the frontier's
    at the same held-out IFT loss, with a paired bootstrap CI (harmful prompts and held-out
    examples resampled together for every arm, frontier included). Below the frontier only when
    the whole CI is below 0: a point estimate a little under the line is not evidence that
    ML-LR beats lowering every learning rate."""
    harmful = pooled_rows(keyword, headline_metric("attack_success"), alignment_benchmarks)
    attack = per_item(harmful, "success")
    loss = per_item(ift_loss[ift_loss["kind"] == "ift_heldout"], "loss")
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


def most_robust_modules(robustness: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The `n` modules of lowest score (mean over perturbations, alphas and seeds)."""
    return (
        robustness.groupby(["layer", "module"], as_index=False)[["score", *METRICS]]
        .mean()
        .sort_values(["score", "layer"])
        .head(n)
    )


def robustness_spread(robustness: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD (over layers, alphas and seeds) of each metric per perturbation and module."""
    spread = robustness.groupby(["perturbation", "module"])[list(METRICS)].agg(["mean", "std"])
    spread = spread.round(4)
    spread.columns = [f"{m}_{stat}" for m, stat in spread.columns]
    return spread.reset_index()
