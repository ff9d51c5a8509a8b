"""The vanilla frontier's statistics: the monotone (isotonic + PCHIP) curve of the verdict beside
the straight lines, the gaps per harmful benchmark, the paired difference of two arms' gaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from securetune.report.stats import (
    frontier_gaps,
    frontier_verdicts,
    monotone_frontier,
    paired_gap_difference,
)
from securetune.report.tables import frontier_section

KINDS = {"v_hi": "vanilla", "v_mid": "vanilla", "v_lo": "vanilla", "base": "reference"}
LOSS = {"v_hi": 1.0, "v_mid": 1.1, "v_lo": 1.3, "base": 1.5}


def _gaps(frontier_attack: dict[str, float], arm: tuple[float, float]):
    """The gaps of one ML-LR arm at (loss, attack success) to the given frontier points."""
    loss = pd.Series(LOSS | {"ml_lr": arm[0]})
    attack = pd.Series(frontier_attack | {"ml_lr": arm[1]})
    return frontier_gaps(attack, loss, KINDS | {"ml_lr": "ml_lr"})["ml_lr"]


def test_a_convex_frontier_judges_an_arm_between_points_by_its_bend():
    # Safety drops fast over the first steps of training, then slowly: a convex frontier.
    convex = {"v_hi": 0.6, "v_mid": 0.2, "v_lo": 0.1, "base": 0.05}
    # Between v_mid and v_lo the straight line (0.15 at 1.2) lies above the curve (~0.134):
    # the line calls this arm safer than the frontier, the curve less safe.
    gap = _gaps(convex, (1.2, 0.142))
    assert gap.linear == pytest.approx(0.142 - 0.15)
    assert gap.linear < 0 < gap.monotone
    curve = monotone_frontier(np.array(list(LOSS.values())), np.array(list(convex.values())))
    assert gap.monotone == pytest.approx(0.142 - float(curve(1.2)))
    # At a frontier point both agree.
    assert _gaps(convex, (1.1, 0.2)) == pytest.approx((0.0, 0.0))


def test_a_vanilla_point_against_the_trend_is_pooled_with_its_neighbour():
    # v_lo (higher loss, less task fit) has more attack success than v_mid: noise, pooled.
    rough = {"v_hi": 0.6, "v_mid": 0.2, "v_lo": 0.3, "base": 0.05}
    x, y = np.array(list(LOSS.values())), np.array(list(rough.values()))
    grid = np.linspace(1.0, 1.5, 101)
    assert np.all(np.diff(monotone_frontier(x, y)(grid)) <= 1e-12)
    assert monotone_frontier(x, y)([1.1, 1.2, 1.3]) == pytest.approx([0.25, 0.25, 0.25])
    # The straight line climbs to v_lo's 0.3 and calls the arm safer; the pooled curve does not.
    gap = _gaps(rough, (1.25, 0.26))
    assert gap.linear == pytest.approx(0.26 - 0.275)
    assert gap.monotone == pytest.approx(0.26 - 0.25)
    # Two points at the same loss are one point, their mean.
    twin = monotone_frontier(np.array([1.0, 1.0, 1.2]), np.array([0.4, 0.2, 0.1]))
    assert float(twin(1.0)) == pytest.approx(0.3)


def _tables(
    arms: dict[str, tuple[float, dict[str, float]]], n_prompts: int = 300, n_examples: int = 100
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keyword scores and held-out losses with, per arm, (loss, attack success per benchmark);
    the same prompts are harder or easier for every arm, as with real arms."""
    rng = np.random.default_rng(0)
    hardness, noise = rng.random(n_prompts), rng.normal(0.0, 0.05, n_examples)
    keyword = pd.DataFrame(
        [{"benchmark": benchmark, "prompt_id": i, "arm": arm, "kind": "harmful",
          "success": float(hardness[i] < rate)}
         for arm, (_, rates) in arms.items() for benchmark, rate in rates.items()
         for i in range(n_prompts)]
    )  # fmt: skip
    ift_loss = pd.DataFrame(
        [{"benchmark": "ift_heldout", "example_id": i, "arm": arm, "kind": "ift_heldout",
          "loss": loss + noise[i]}
         for arm, (loss, _) in arms.items() for i in range(n_examples)]
    )  # fmt: skip
    return keyword, ift_loss


def _same_on_both(rate: float) -> dict[str, float]:
    return {"advbench": rate, "strongreject": rate}


# A frontier with the same rates on both benchmarks; ml_lr is far safer on AdvBench and far
# less safe on StrongREJECT, so pooled it sits near the line.
SPLIT_ARMS = {
    "v_hi": (1.0, _same_on_both(0.6)),
    "v_lo": (1.2, _same_on_both(0.2)),
    "base": (1.4, _same_on_both(0.0)),
    "ml_lr": (1.1, {"advbench": 0.05, "strongreject": 0.75}),
    "freeze": (1.3, _same_on_both(0.1)),
}
SPLIT_KINDS = {"v_hi": "vanilla", "v_lo": "vanilla", "base": "reference", "ml_lr": "ml_lr"}
SPLIT_KINDS |= {"freeze": "freeze"}


def test_verdicts_per_benchmark_follow_the_pooled_row_of_each_arm():
    keyword, ift_loss = _tables(SPLIT_ARMS)
    verdicts = frontier_verdicts(keyword, ift_loss, SPLIT_KINDS, 300, 0.95, 0)
    assert list(zip(verdicts["arm"], verdicts["benchmark"], strict=True)) == [
        (arm, benchmark)
        for arm in ("ml_lr", "freeze")
        for benchmark in ("pooled", "advbench", "strongreject")
    ]
    ml_lr = verdicts[verdicts["arm"] == "ml_lr"].set_index("benchmark")
    by_benchmark = keyword[keyword["arm"] == "ml_lr"].groupby("benchmark")["success"].mean()
    assert ml_lr.loc["advbench", "attack_success"] == pytest.approx(by_benchmark["advbench"])
    assert ml_lr.loc["pooled", "attack_success"] == pytest.approx(by_benchmark.mean())
    assert (ml_lr["heldout_ift_loss"] == ml_lr.loc["pooled", "heldout_ift_loss"]).all()
    assert ml_lr.loc["advbench", "verdict"].startswith("below")
    assert ml_lr.loc["strongreject", "verdict"].startswith("above")
    # Same frontier on both benchmarks of equal size: the pooled gap is the mean of theirs.
    assert ml_lr.loc["pooled", "gap"] == pytest.approx(
        (ml_lr.loc["advbench", "gap"] + ml_lr.loc["strongreject", "gap"]) / 2
    )
    for gap in ("gap", "gap_linear"):
        assert (ml_lr[f"{gap}_ci_low"] <= ml_lr[gap]).all()
        assert (ml_lr[gap] <= ml_lr[f"{gap}_ci_high"]).all()
    section = frontier_section(verdicts)
    pooled_table, per_benchmark = section.split("Per harmful benchmark:")
    assert "| arm | heldout_ift_loss |" in pooled_table and "strongreject" not in pooled_table
    assert per_benchmark.count("| ml_lr | advbench |") == 1 and "pooled" not in per_benchmark


def test_paired_gap_difference_compares_two_arms_on_the_same_resamples():
    arms = dict(SPLIT_ARMS)
    # Two selectors at the same loss: "safer" answers fewer harmful prompts than "plain".
    arms["plain"] = (1.1, _same_on_both(0.35))
    arms["safer"] = (1.1, _same_on_both(0.25))
    arms["twin"] = arms["plain"]
    kinds = SPLIT_KINDS | {"plain": "ml_lr", "safer": "ml_lr", "twin": "ml_lr"}
    keyword, ift_loss = _tables(arms)
    mean, low, high = paired_gap_difference(
        keyword, ift_loss, kinds, "safer", "plain", 300, 0.95, 0
    )
    # At the same loss the frontier is the same: the gaps differ by the attack successes.
    asr = keyword.groupby("arm")["success"].mean()
    assert mean == pytest.approx(asr["safer"] - asr["plain"]) and mean < -0.05
    assert low <= mean <= high < 0
    verdicts = frontier_verdicts(keyword, ift_loss, kinds, 10, 0.95, 0)
    pooled = verdicts[verdicts["benchmark"] == "pooled"].set_index("arm")["gap"]
    assert mean == pytest.approx(pooled["safer"] - pooled["plain"])
    # The same arm's data twice: every resample's difference is exactly 0.
    assert paired_gap_difference(keyword, ift_loss, kinds, "twin", "plain", 100, 0.95, 0) == (
        0.0,
        0.0,
        0.0,
    )
    # A vanilla arm has no gap to its own frontier: nothing to compare.
    assert np.isnan(
        paired_gap_difference(keyword, ift_loss, kinds, "v_hi", "plain", 20, 0.95, 0)[0]
    )


def test_no_harmful_prompts_or_held_out_loss_gives_no_frontier_rather_than_an_error():
    keyword, ift_loss = _tables(SPLIT_ARMS)
    no_loss = ift_loss.iloc[0:0]
    verdicts = frontier_verdicts(keyword, no_loss, SPLIT_KINDS, 20, 0.95, 0)
    assert verdicts["verdict"].str.startswith("no frontier").all()
    no_prompts = frontier_verdicts(keyword.iloc[0:0], ift_loss, SPLIT_KINDS, 20, 0.95, 0)
    assert list(no_prompts["benchmark"]) == ["pooled", "pooled"]
    assert no_prompts["gap"].isna().all()


def test_the_frontier_figure_draws_the_curve_or_skips_it(tmp_path):
    from securetune.report.figures import plot_safety_frontier

    headline = pd.DataFrame(
        [(arm, "x", metric, v, v - 0.05, v + 0.05, 10)
         for arm, (loss, rates) in SPLIT_ARMS.items()
         for metric, v in (("heldout_ift_loss", loss), ("attack_success", rates["advbench"]))],
        columns=["arm", "benchmark", "metric", "value", "ci_low", "ci_high", "n"],
    )  # fmt: skip
    plot_safety_frontier(headline, SPLIT_KINDS, tmp_path / "frontier.png")
    lone = {"v_hi": "vanilla", "ml_lr": "ml_lr"}
    plot_safety_frontier(headline, lone, tmp_path / "lone.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "lone.png").exists()
