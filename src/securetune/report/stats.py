"""The report's numbers: bootstrap intervals over prompts (and seeds), the headline rates, the
vanilla frontier and each ML-LR arm's gap to it, the robustness summaries. No plotting here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.interpolate import PchipInterpolator
from scipy.stats import norm
from sklearn.isotonic import isotonic_regression

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
# The per-row values that are 0/1 outcomes, whose means are rates: their intervals are
# `rate_interval`'s, never of zero width at a rate of 0 or 1.
BINARY_COLUMNS = ("success", "unsafe")
RATE_COLUMNS = ["arm", "benchmark", "metric", "value", "ci_low", "ci_high", "n"]
# The per-benchmark rate of the keyword scores' `success_lenient` column.
LENIENT_ATTACK_SUCCESS = "attack_success_lenient"


def bootstrap_ci(
    values: np.ndarray,
    n_resamples: int,
    level: float,
    seed: int,
    groups: np.ndarray | None = None,
    binary: bool = False,
) -> tuple[float, float, float]:
    """(mean, low, high) of `values`: a percentile bootstrap (`percentile_bootstrap`), or for a
    rate (`binary`: 0/1 outcomes) an interval that never has zero width (`rate_interval`).
    NaN values (a judge verdict that could not be parsed) are left out."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    labels = None if groups is None else np.asarray(groups)[keep]
    if binary:
        return rate_interval(values[keep], n_resamples, level, seed, labels)
    return percentile_bootstrap(values[keep], n_resamples, level, seed, labels)


def percentile_bootstrap(
    values: np.ndarray,
    n_resamples: int,
    level: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean, resampling prompts with replacement
    (values without NaN: `bootstrap_ci` leaves those out).

    With `groups` (one seed label per value) and more than one seed, resampling is two-level:
    seeds first, then prompts within each drawn seed, so the interval covers seed-to-seed
    variation (of fine-tuning or sampling) as well as the choice of prompts.
    """
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if not _replicated(groups):
        means = rng.choice(values, size=(n_resamples, len(values)), replace=True).mean(axis=1)
    else:
        per_seed = [values[groups == g] for g in np.unique(groups)]
        means = np.empty(n_resamples)
        for i in range(n_resamples):
            drawn = rng.integers(0, len(per_seed), size=len(per_seed))
            means[i] = np.concatenate(
                [rng.choice(per_seed[d], size=len(per_seed[d]), replace=True) for d in drawn]
            ).mean()
    low, high = _percentiles(means, level)
    return float(values.mean()), low, high


def _replicated(labels: np.ndarray | None) -> bool:
    return labels is not None and len(np.unique(labels)) >= 2


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of `samples`."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def wilson_interval(successes: float, n: float, level: float) -> tuple[float, float]:
    """(low, high): the Wilson score interval of a binomial rate. Unlike a bootstrap it has
    width at 0/n and n/n (0/20 at 95%: up to 0.161), where resampling only ever draws 0s."""
    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + level / 2.0))
    rate = successes / n
    shrink = 1.0 + z**2 / n
    centre = (rate + z**2 / (2 * n)) / shrink
    half = z * np.sqrt(rate * (1.0 - rate) / n + z**2 / (4 * n**2)) / shrink
    # At 0/n and n/n the bound is the rate itself, which rounding may put a hair past it (an
    # interval that excludes its own point estimate).
    return float(min(rate, max(0.0, centre - half))), float(max(rate, min(1.0, centre + half)))


def rate_interval(
    values: np.ndarray,
    n_resamples: int,
    level: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(rate, low, high) of 0/1 outcomes (no NaN). One seed: the Wilson interval. Several: the
    two-level bootstrap (seed-to-seed spread) widened to at least the Wilson interval, so a
    rate of 0 or 1 on every seed still gets an interval of the prompts' sampling error."""
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("rate_interval: values must be 0 or 1 (a rate's outcomes)")
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    if not _replicated(groups):
        return (float(values.mean()), *wilson_interval(values.sum(), len(values), level))
    mean, low, high = percentile_bootstrap(values, n_resamples, level, seed, groups)
    # Wilson's n is the prompts of one replicate: replicates of the same prompts are not
    # independent draws of prompts, so counting every row would narrow it.
    per_replicate = len(values) / len(np.unique(groups))
    wilson_low, wilson_high = wilson_interval(mean * per_replicate, per_replicate, level)
    return mean, min(low, wilson_low), max(high, wilson_high)


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
            group["success"].to_numpy(),
            n_resamples,
            level,
            stable_seed(seed, arm, benchmark),
            _replicates(group),
            binary=True,
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
                _replicates(group),
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
        _replicates(group),
        binary=True,
    )
    return _rate(arm, benchmark, LENIENT_ATTACK_SUCCESS, ci, len(group))


def _replicates(group: pd.DataFrame) -> np.ndarray | None:
    """The replicate label of each row, where the table has them (the bootstrap's groups)."""
    return group["replicate"].to_numpy() if "replicate" in group else None


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
    alignment_benchmarks: tuple[str, ...] = (),
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
            seed_of_metric = stable_seed(seed, arm, metric.name)
            binary = metric.column in BINARY_COLUMNS
            ci = bootstrap_ci(values, n_resamples, level, seed_of_metric, groups, binary)
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
    arms, losses, attacks = _frontier_arrays(attack, loss, arm_kinds)
    return pd.DataFrame({"arm": arms, "loss": losses, "attack_success": attacks})


def _frontier_arrays(
    attack: pd.Series, loss: pd.Series, arm_kinds: dict[str, str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`frontier_points` as (arms, losses, attack successes) without building a DataFrame,
    which would take most of the time of a bootstrap that computes it thousands of times."""
    uniform = [a for a, k in arm_kinds.items() if k == VANILLA_KIND or a == BASE_ARM]
    points = [(a, float(loss[a]), float(attack[a])) for a in uniform if a in attack and a in loss]
    points = [p for p in points if not (np.isnan(p[1]) or np.isnan(p[2]))]
    points.sort(key=lambda p: p[1])
    arms = [p[0] for p in points]
    return arms, np.array([p[1] for p in points]), np.array([p[2] for p in points])


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
    wide = per_item_replicates(pooled_rows(table, metric, alignment_benchmarks), metric.column)
    if not {arm, reference} <= set(wide.columns.unique("arm")):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(stable_seed(seed, "paired", arm, reference, metric_name))

    def difference(rows: np.ndarray, labels: np.ndarray | None) -> float:
        arms, values = _replicate_means(wide, labels)
        first, second = arms.get_loc(arm), arms.get_loc(reference)
        return float((values[rows, first] - values[rows, second]).mean())

    every = np.arange(len(wide))
    if len(every) == 0:
        return float("nan"), float("nan"), float("nan")
    # A difference of two rates is no rate (-1, 0 or 1 per prompt): the plain bootstrap, over
    # replicates (drawn alike for both arms), then prompts.
    samples = np.array([
        difference(rng.choice(every, len(every)), _draw_replicates(wide, rng))
        for _ in range(n_resamples)
    ])  # fmt: skip
    return (difference(every, None), *_percentiles(samples, level))


def compared_arms(arm_kinds: dict[str, str]) -> list[str]:
    """The arms set against the frontier: those neither uniform-lr nor reference models."""
    return [a for a, k in arm_kinds.items() if k not in (VANILLA_KIND, REFERENCE_KIND)]


class FrontierGap(NamedTuple):
    """An arm's attack success minus the vanilla frontier's at the arm's held-out loss."""

    # Against the monotone curve (`monotone_frontier`): the verdict's.
    monotone: float
    # Against straight lines between the points: shown beside it, for comparison.
    linear: float


NO_GAP = FrontierGap(float("nan"), float("nan"))


def monotone_frontier(loss: np.ndarray, attack: np.ndarray) -> PchipInterpolator:
    """The frontier as a curve through points (`loss`, `attack`), in any order, with two or more
    distinct losses: attack success made non-increasing in loss, then PCHIP through it.

    Non-increasing: a lower held-out loss means more task fit, the weights further from the
    aligned base, so more attack success; a vanilla point against that trend is noise of a few
    prompts, pooled with its neighbour (isotonic regression) rather than bending the curve.
    PCHIP: a frontier that bends (convex) lies below the straight lines between its points,
    so those lines would favour any arm between them; PCHIP follows the bend, keeps monotone
    points monotone and never overshoots them (a cubic spline can)."""
    unique, position, count = np.unique(loss, return_inverse=True, return_counts=True)
    mean = np.bincount(position, weights=attack) / count
    # Already monotone (the usual case): the isotonic fit is the points themselves; skipping it
    # saves most of the time of thousands of resamples.
    if np.any(np.diff(mean) > 0):
        mean = isotonic_regression(mean, sample_weight=count, increasing=False)
    return PchipInterpolator(unique, mean)


def has_frontier(attack: pd.Series, loss: pd.Series, arm_kinds: dict[str, str]) -> bool:
    """Whether the frontier's points span a loss range: two or more distinct losses."""
    return len(np.unique(_frontier_arrays(attack, loss, arm_kinds)[1])) >= 2


def frontier_gaps(
    attack: pd.Series, loss: pd.Series, arm_kinds: dict[str, str]
) -> dict[str, FrontierGap]:
    """Each compared arm's gap to the vanilla frontier, against the monotone curve and the
    straight lines; NaN outside the frontier's loss range or without a frontier."""
    _, x, y = _frontier_arrays(attack, loss, arm_kinds)
    arms = compared_arms(arm_kinds)
    if len(np.unique(x)) < 2:
        return dict.fromkeys(arms, NO_GAP)
    curve = monotone_frontier(x, y)
    gaps = {}
    for arm in arms:
        at = loss.get(arm, float("nan"))
        inside = arm in attack and x[0] <= at <= x[-1]
        gaps[arm] = (
            FrontierGap(float(attack[arm] - curve(at)), float(attack[arm] - np.interp(at, x, y)))
            if inside
            else NO_GAP
        )
    return gaps


# The frontier verdicts' row for every harmful prompt together, before the per-benchmark rows.
POOLED = "pooled"
VERDICT_COLUMNS = [
    "arm", "benchmark", "heldout_ift_loss", "attack_success", "gap", "gap_ci_low",
    "gap_ci_high", "gap_linear", "gap_linear_ci_low", "gap_linear_ci_high",
    "resamples_in_range", "verdict",
]  # fmt: skip


def _strata(items: pd.DataFrame) -> list[np.ndarray]:
    """Row positions of each benchmark's items, in the items' (sorted) benchmark order."""
    benchmark = items.index.get_level_values("benchmark")
    return [np.flatnonzero(benchmark == name) for name in benchmark.unique()]


def _mean_of_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each column's mean over `rows`; NaN (without a warning) when there are none."""
    return values[rows].mean(axis=0) if len(rows) else np.full(values.shape[1], np.nan)


@dataclass(frozen=True)
class FrontierItems:
    """The frontier's per-item values, paired across arms: harmful prompts (benchmark,
    prompt) x (arm, replicate) and held-out IFT examples x (arm, replicate). A resample first
    draws each arm's replicates (with replacement; training seeds vary the arm too), then the
    same items for every arm, within each benchmark, so that every benchmark keeps its size."""

    attack: pd.DataFrame
    loss: pd.DataFrame

    @classmethod
    def from_tables(
        cls,
        keyword: pd.DataFrame,
        ift_loss: pd.DataFrame,
        alignment_benchmarks: tuple[str, ...] = (),
    ) -> FrontierItems:
        """From the keyword scores (the headline attack success's benchmarks: those the
        alignment set took no rows of) and the held-out losses (`per_item_replicates` of each)."""
        harmful = pooled_rows(keyword, headline_metric("attack_success"), alignment_benchmarks)
        return cls(
            per_item_replicates(harmful, "success"),
            per_item_replicates(ift_loss[ift_loss["kind"] == "ift_heldout"], "loss"),
        )

    @cached_property
    def _attack_strata(self) -> list[np.ndarray]:
        return _strata(self.attack)

    @cached_property
    def _loss_rows(self) -> np.ndarray:
        return np.arange(len(self.loss))

    def means(self, rng: np.random.Generator | None = None) -> tuple[pd.DataFrame, pd.Series]:
        """(attack success, benchmark x arm with the pooled row first; held-out loss per arm)
        over every item and replicate or, given `rng`, over one resample of them."""
        strata = self._attack_strata
        labels = None
        if rng is not None:
            labels = _draw_replicates(self.attack, rng)
            strata = [rng.choice(rows, size=len(rows)) for rows in strata]
        arms, values = _replicate_means(self.attack, labels)
        pooled = _mean_of_rows(values, np.concatenate([np.empty(0, dtype=int), *strata]))
        attack = pd.DataFrame(
            np.vstack([pooled, *(_mean_of_rows(values, rows) for rows in strata)]),
            index=[POOLED, *self.attack.index.unique("benchmark")],
            columns=arms,
        )
        rows = self._loss_rows if rng is None else rng.choice(self._loss_rows, len(self._loss_rows))
        loss_arms, loss_values = _replicate_means(self.loss, labels)
        return attack, pd.Series(_mean_of_rows(loss_values, rows), loss_arms)


def per_item_replicates(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """Item (benchmark, prompt or example id) x (arm, replicate), keeping only items every
    replicate of every arm has (a table without replicates is replicate 0 throughout)."""
    item = "prompt_id" if "prompt_id" in rows else "example_id"
    rows = rows if "replicate" in rows else rows.assign(replicate=0)
    wide = rows.pivot_table(
        index=["benchmark", item], columns=["arm", "replicate"], values=column, aggfunc="mean"
    )
    return wide.dropna()


def _draw_replicates(wide: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """One draw, with replacement, of the replicate numbers: replicate k of every arm shares
    its data order, so the arms' replicates are drawn alike (and for every table of a draw)."""
    labels = np.unique(wide.columns.get_level_values("replicate"))
    return rng.choice(labels, size=len(labels))


def _replicate_means(wide: pd.DataFrame, labels: np.ndarray | None) -> tuple[pd.Index, np.ndarray]:
    """(arms, item x arm values): each arm's mean over its replicates, or over the drawn
    replicate numbers `labels` (with their repeats) that it has; an arm with one replicate
    (base, vanilla) is that one."""
    arms = wide.columns.unique("arm")
    values = wide.to_numpy(dtype=float)
    arm_of = wide.columns.get_level_values("arm")
    replicate_of = wide.columns.get_level_values("replicate")
    columns = []
    for arm in arms:
        own = np.flatnonzero(arm_of == arm)
        if labels is not None and len(own) > 1:
            by_label = {replicate_of[i]: i for i in own}
            drawn = [by_label[r] for r in labels if r in by_label]
            own = np.array(drawn) if drawn else own
        columns.append(values[:, own].mean(axis=1))
    return arms, np.column_stack(columns) if columns else np.empty((len(wide), 0))


def benchmark_gaps(
    attack: pd.DataFrame, loss: pd.Series, arm_kinds: dict[str, str]
) -> dict[str, dict[str, FrontierGap]]:
    """benchmark (the pooled row's and each harmful benchmark's) -> arm -> gap, each against
    the frontier of that benchmark's attack success."""
    return {name: frontier_gaps(attack.loc[name], loss, arm_kinds) for name in attack.index}


def _defined_percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central interval of the samples that are defined (an arm's loss can leave the
    frontier's range in some resamples); NaN when none is."""
    defined = samples[~np.isnan(samples)]
    return _percentiles(defined, level) if len(defined) else (float("nan"), float("nan"))


def frontier_verdicts(
    keyword: pd.DataFrame,
    ift_loss: pd.DataFrame,
    arm_kinds: dict[str, str],
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Where each non-vanilla fine-tuned arm lies against the vanilla frontier: its attack
    success minus the frontier's at the same held-out IFT loss (the monotone curve's, with the
    straight lines' beside it), pooled over the headline's harmful prompts (the benchmarks the
    alignment set took no rows of) and per such benchmark, with paired bootstrap CIs (prompts,
    within each benchmark, and held-out examples resampled together for every arm, frontier
    included). Below the frontier only when the whole CI is below 0: a point estimate a little
    under the line is not evidence that ML-LR beats lowering every learning rate."""
    items = FrontierItems.from_tables(keyword, ift_loss, alignment_benchmarks)
    attack, loss = items.means()
    point = benchmark_gaps(attack, loss, arm_kinds)
    rng = np.random.default_rng(stable_seed(seed, "frontier"))
    draws = [benchmark_gaps(*items.means(rng), arm_kinds) for _ in range(n_resamples)]
    rows = []
    for arm in compared_arms(arm_kinds):
        for name in attack.index:
            samples = np.array([draw[name][arm] for draw in draws]).reshape(-1, 2)
            frontier = has_frontier(attack.loc[name], loss, arm_kinds)
            measured = (loss.get(arm, np.nan), attack.loc[name].get(arm, np.nan))
            rows.append(
                _verdict_row(arm, name, measured, point[name][arm], samples, level, frontier)
            )
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _verdict_row(
    arm: str,
    benchmark: str,
    measured: tuple[float, float],
    gap: FrontierGap,
    samples: np.ndarray,
    level: float,
    frontier: bool,
) -> list[object]:
    """One verdict row: the arm's (loss, attack success), both gaps with their CIs from the
    resamples' (monotone, linear) gaps, and the verdict of the monotone one."""
    low, high = _defined_percentiles(samples[:, 0], level)
    linear_low, linear_high = _defined_percentiles(samples[:, 1], level)
    in_range = float(np.mean(~np.isnan(samples[:, 0]))) if len(samples) else float("nan")
    verdict = _verdict(gap.monotone, low, high, frontier)
    return [arm, benchmark, *measured, gap.monotone, low, high, gap.linear, linear_low,
            linear_high, in_range, verdict]  # fmt: skip


def paired_gap_difference(
    keyword: pd.DataFrame,
    ift_loss: pd.DataFrame,
    arm_kinds: dict[str, str],
    arm: str,
    other: str,
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...] = (),
) -> tuple[float, float, float]:
    """(mean, low, high) of `arm`'s monotone frontier gap (pooled) minus `other`'s, with a
    paired bootstrap CI: the same resampled prompts and held-out examples for both arms and the
    frontier, so two selectors at the same budget and gamma are compared directly (below 0:
    `arm` is the safer at its loss). NaN where either gap is undefined."""
    items = FrontierItems.from_tables(keyword, ift_loss, alignment_benchmarks)

    def difference(attack: pd.DataFrame, loss: pd.Series) -> float:
        gaps = frontier_gaps(attack.loc[POOLED], loss, arm_kinds)
        return gaps.get(arm, NO_GAP).monotone - gaps.get(other, NO_GAP).monotone

    rng = np.random.default_rng(stable_seed(seed, "frontier_pair", arm, other))
    samples = np.array([difference(*items.means(rng)) for _ in range(n_resamples)])
    return (difference(*items.means()), *_defined_percentiles(samples, level))


def selector_comparison(
    keyword: pd.DataFrame,
    ift_loss: pd.DataFrame,
    arm_kinds: dict[str, str],
    pairs: list[list[str]],
    n_resamples: int,
    level: float,
    seed: int,
    alignment_benchmarks: tuple[str, ...] = (),
) -> pd.DataFrame:
    """For each (control, robust) pair of one budget and gamma: the robust arm's frontier gap
    minus the control's, paired over replicates and prompts (below 0: the robust modules are
    the safer choice at their loss; only a CI wholly below 0 says so)."""
    rows = []
    for control, robust in pairs:
        mean, low, high = paired_gap_difference(
            keyword, ift_loss, arm_kinds, robust, control, n_resamples, level, seed,
            alignment_benchmarks,
        )  # fmt: skip
        if np.isnan(mean):
            verdict = "undefined (an arm outside the frontier's loss range)"
        elif high < 0:
            verdict = "robust safer (the CI excludes 0)"
        elif low > 0:
            verdict = "control safer (the CI excludes 0)"
        else:
            verdict = "no difference shown (the CI spans 0)"
        rows.append([robust, control, mean, low, high, verdict])
    columns = ["robust_arm", "control_arm", "gap_difference", "ci_low", "ci_high", "verdict"]
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
