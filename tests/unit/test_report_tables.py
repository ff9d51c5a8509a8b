"""Headline metrics of the main table and the bootstrap over prompts and seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.interpolate import PchipInterpolator

from securetune.report.stats import (
    bootstrap_ci,
    frontier_verdicts,
    headline_rates,
    paired_difference,
    summarise_scores,
    wilson_interval,
)
from securetune.report.tables import headline_table, main_table


def test_bootstrap_ignores_nan_and_brackets_the_mean():
    values = np.array([1, 0, 1, 1, np.nan, 0, 1, 1])
    mean, low, high = bootstrap_ci(values, 2000, 0.95, 0)
    assert mean == 5 / 7 and low <= mean <= high
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([np.nan]), 100, 0.95, 0))


def test_seed_level_resampling_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(0)
    # Two seeds with very different rates: prompt-only resampling misses that spread.
    values = np.concatenate([rng.random(200) < 0.1, rng.random(200) < 0.9]).astype(float)
    seeds = np.repeat([0, 1], 200)
    _, lo1, hi1 = bootstrap_ci(values, 2000, 0.95, 0)
    _, lo2, hi2 = bootstrap_ci(values, 2000, 0.95, 0, groups=seeds)
    assert (hi2 - lo2) > 3 * (hi1 - lo1)
    # One seed: the same as no groups.
    assert bootstrap_ci(values, 500, 0.95, 1, np.zeros(400)) == bootstrap_ci(values, 500, 0.95, 1)


@pytest.mark.parametrize(
    ("successes", "n", "level", "expected"),
    [
        # Known values (e.g. Brown, Cai & DasGupta 2001; any Wilson calculator).
        (0, 20, 0.95, (0.0, 0.16113)),
        (10, 20, 0.95, (0.29929, 0.70071)),
        (20, 20, 0.95, (0.83887, 1.0)),
    ],
)
def test_wilson_interval_matches_known_values(successes, n, level, expected):
    assert wilson_interval(successes, n, level) == pytest.approx(expected, abs=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0, 0.95))


def test_wilson_bounds_are_where_the_score_test_just_rejects():
    # The interval's definition: the rates p with |3/10 - p| <= z * sqrt(p (1 - p) / 10).
    low, high = wilson_interval(3, 10, 0.90)
    z = 1.6448536269514722
    for p in (low, high):
        assert abs(0.3 - p) == pytest.approx(z * math.sqrt(p * (1 - p) / 10))


def test_a_rate_of_zero_or_one_gets_an_interval_of_nonzero_width():
    zeros, ones = np.zeros(20), np.ones(20)
    # One seed: the Wilson interval (a percentile bootstrap of all-0s is [0, 0]).
    assert bootstrap_ci(zeros, 500, 0.95, 0, binary=True) == pytest.approx(
        (0.0, 0.0, 0.16113), abs=1e-5
    )
    assert bootstrap_ci(ones, 500, 0.95, 0, binary=True)[1] == pytest.approx(0.83887, abs=1e-5)
    # Replicates that all agree: the two-level bootstrap alone is [0, 0]; widened to Wilson's
    # for the 10 prompts of one replicate.
    seeds = np.repeat([0, 1], 10)
    assert bootstrap_ci(zeros, 500, 0.95, 0, seeds, binary=True)[2] == pytest.approx(
        wilson_interval(0, 10, 0.95)[1], abs=1e-9
    )
    # Replicates that disagree keep the bootstrap's wider interval (the union of the two).
    split = np.concatenate([np.zeros(10), np.ones(10)])
    _, low, high = bootstrap_ci(split, 500, 0.95, 0, seeds, binary=True)
    wilson_low, wilson_high = wilson_interval(5, 10, 0.95)
    assert low <= wilson_low and high >= wilson_high and (low, high) != (wilson_low, wilson_high)
    # A score that is no rate (harmfulness 1-5, all 1) keeps the percentile bootstrap.
    assert bootstrap_ci(ones, 500, 0.95, 0) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        bootstrap_ci(np.array([0.0, 0.5]), 10, 0.95, 0, binary=True)


def test_headline_rates_of_zero_have_width_and_scores_keep_the_bootstrap():
    keyword = _keyword()
    keyword = keyword[keyword["kind"] == "harmful"].assign(success=0.0)
    llm = keyword.assign(harmfulness=1.0).drop(columns="success")
    rates = headline_rates({"keyword": keyword, "llm": llm}, 500, 0.95, 0).set_index(
        ["arm", "metric"]
    )
    asr = rates.loc[("base", "attack_success")]
    assert asr["value"] == 0.0 and asr["ci_high"] == pytest.approx(wilson_interval(0, 8, 0.95)[1])
    harm = rates.loc[("base", "harmfulness_score")]
    assert (harm["value"], harm["ci_low"], harm["ci_high"]) == (1.0, 1.0, 1.0)


def _keyword():
    rows = []
    for arm, asr in (("base", 0.25), ("vanilla", 0.75)):
        for i in range(4):
            rows.append(("harmful", "advbench", arm, float(i < asr * 4), np.nan))
            rows.append(("over_refusal", "xstest_safe", arm, float(i == 0), np.nan))
            rows.append(("usability", "self_instruct", arm, False, 0.5))
            rows.append(("harmful", "strongreject", arm, 1.0, np.nan))
    return pd.DataFrame(rows, columns=["kind", "benchmark", "arm", "success", "rouge_l"])


def test_headline_pools_harmful_benchmarks_and_marks_missing_judges():
    guard = pd.DataFrame(
        {
            "arm": ["base"] * 3,
            "kind": "harmful",
            "benchmark": "advbench",
            "unsafe": [1.0, 0.0, np.nan],
        }
    )
    rates = headline_rates({"keyword": _keyword(), "guard": guard}, 500, 0.95, 0, ())
    asr = rates[(rates["metric"] == "attack_success")].set_index("arm")
    assert asr.loc["base", "value"] == (1 + 4) / 8  # advbench 1/4 + strongreject 4/4
    assert asr.loc["base", "benchmark"] == "advbench+strongreject"
    unsafe = rates[rates["metric"] == "unsafe_rate"].set_index("arm")
    assert unsafe.loc["base", "value"] == 0.5 and unsafe.loc["base", "n"] == 2
    usab = rates[rates["metric"] == "usability"]
    assert (usab["value"] == 0.5).all()
    table = headline_table(rates, ["base", "vanilla"])
    assert list(table.columns) == [
        "arm",
        "harmfulness_score",
        "unsafe_rate",
        "attack_success",
        "attack_success_in_alignment",
        "over_refusal",
        "usability",
        "task_accuracy",
        "heldout_ift_loss",
    ]
    row = table.set_index("arm").loc["vanilla"]
    assert row["harmfulness_score"] == "n/a" and row["unsafe_rate"] == "n/a"
    assert row["task_accuracy"] == "n/a"  # no math benchmark configured
    assert row["attack_success"].startswith("0.875 [")
    assert row["attack_success_in_alignment"] == "n/a"  # align off: every benchmark pooled


def test_headline_attack_success_leaves_the_alignment_benchmarks_out():
    """AdvBench trained the refusals (other rows of it): the headline pools the rest and shows
    AdvBench apart; the judges' harmful metrics pool the same benchmarks."""
    guard = pd.DataFrame(
        {"arm": "base", "kind": "harmful", "benchmark": ["advbench", "strongreject"],
         "unsafe": [1.0, 0.0]}
    )  # fmt: skip
    rates = headline_rates({"keyword": _keyword(), "guard": guard}, 200, 0.95, 0, ("advbench",))
    rates = rates[rates["arm"] == "base"].set_index("metric")
    assert rates.loc["attack_success", "value"] == 1.0  # strongreject 4/4 alone
    assert rates.loc["attack_success", "benchmark"] == "strongreject"
    assert rates.loc["attack_success_in_alignment", "value"] == 0.25  # advbench 1/4
    assert rates.loc["attack_success_in_alignment", "benchmark"] == "advbench"
    assert rates.loc["unsafe_rate", "value"] == 0.0


def test_per_benchmark_table_shows_strict_and_lenient_attack_success():
    # Four harmful answers: one complies, two answered in the task's style, one refused.
    scores = pd.DataFrame(
        {
            "arm": "vanilla",
            "benchmark": "harmbench",
            "kind": "harmful",
            "success": [True, False, False, False],
            "success_lenient": [True, True, True, False],
            "rouge_l": np.nan,
        }
    )
    rates = summarise_scores(scores, 200, 0.95, 0).set_index("metric")
    assert rates.loc["attack_success", "value"] == 0.25
    assert rates.loc["attack_success_lenient", "value"] == 0.75
    table = main_table(rates.reset_index(), pd.DataFrame(), ["vanilla"])
    assert {"attack_success:harmbench", "attack_success_lenient:harmbench"} <= set(table.columns)


def _frontier_tables(arms: dict[str, tuple[float, float]], n_prompts=400, n_examples=200):
    """Per-prompt keyword scores and per-example held-out losses with the given (loss, attack
    success) per arm, correlated across arms the way real arms are (same prompts, same data)."""
    rng = np.random.default_rng(0)
    hardness, noise = rng.random(n_prompts), rng.normal(0.0, 0.1, n_examples)
    keyword = pd.DataFrame(
        [{"benchmark": "advbench", "prompt_id": i, "arm": arm, "kind": "harmful",
          "success": bool(hardness[i] < attack)}
         for arm, (_, attack) in arms.items() for i in range(n_prompts)]
    )  # fmt: skip
    ift_loss = pd.DataFrame(
        [{"benchmark": "ift_heldout", "example_id": i, "arm": arm, "kind": "ift_heldout",
          "loss": loss + noise[i]}
         for arm, (loss, _) in arms.items() for i in range(n_examples)]
    )  # fmt: skip
    return keyword, ift_loss


def _pooled(verdicts: pd.DataFrame) -> pd.DataFrame:
    return verdicts[verdicts["benchmark"] == "pooled"].set_index("arm")


def test_ml_lr_is_judged_against_the_vanilla_frontier_at_its_own_loss():
    # Vanilla at three learning rates: lower lr, higher loss, lower attack success.
    arms = {"v_hi": (1.0, 0.4), "v_mid": (1.1, 0.3), "v_lo": (1.3, 0.1)}
    arms |= {"ml_lr": (1.05, 0.05), "worse": (1.2, 0.5), "same": (1.1, 0.3), "off": (0.9, 0.0)}
    arms |= {"base": (1.5, 0.05), "frozen": (1.4, 0.1)}
    kinds = {"base": "reference", "v_hi": "vanilla", "v_mid": "vanilla", "v_lo": "vanilla"}
    kinds |= {"ml_lr": "ml_lr", "worse": "ml_lr", "same": "ml_lr", "off": "freeze"}
    kinds |= {"frozen": "freeze"}
    keyword, ift_loss = _frontier_tables(arms)
    verdicts = _pooled(frontier_verdicts(keyword, ift_loss, kinds, 500, 0.95, 0, ()))
    assert list(verdicts.index) == ["ml_lr", "worse", "same", "off", "frozen"]
    asr = keyword.groupby("arm")["success"].mean()
    loss = ift_loss.groupby("arm")["loss"].mean()
    # The verdict's gap is to the PCHIP curve through the (here already monotone) points.
    frontier = ["v_hi", "v_mid", "v_lo", "base"]
    curve = PchipInterpolator(loss[frontier], asr[frontier])
    for arm in ("ml_lr", "worse", "frozen"):
        assert verdicts.loc[arm, "gap"] == pytest.approx(asr[arm] - curve(loss[arm]))
    ml_lr = verdicts.loc["ml_lr"]
    # Halfway between v_hi (loss 1.0) and v_mid (1.1): the straight line is their mean.
    assert ml_lr["gap_linear"] == pytest.approx(asr["ml_lr"] - (asr["v_hi"] + asr["v_mid"]) / 2)
    assert ml_lr["gap_ci_low"] <= ml_lr["gap"] <= ml_lr["gap_ci_high"] < 0
    assert ml_lr["gap_linear_ci_low"] <= ml_lr["gap_linear"] <= ml_lr["gap_linear_ci_high"] < 0
    assert ml_lr["verdict"].startswith("below")
    assert verdicts.loc["worse", "gap_linear"] == pytest.approx(
        asr["worse"] - (asr["v_mid"] + asr["v_lo"]) / 2
    )
    assert verdicts.loc["worse", "verdict"].startswith("above")
    # On the line: a point estimate of 0 is no evidence either way.
    same = verdicts.loc["same"]
    assert same["gap"] == pytest.approx(0.0) and same["gap_linear"] == pytest.approx(0.0)
    assert same["gap_ci_low"] <= 0 <= same["gap_ci_high"]
    assert same["verdict"].startswith("on the frontier")
    assert verdicts.loc["off", "verdict"] == "outside the frontier's loss range"
    # Past the lowest vanilla lr the line runs on to the base model, vanilla at lr 0.
    assert verdicts.loc["frozen", "gap_linear"] == pytest.approx(
        asr["frozen"] - (asr["v_lo"] + asr["base"]) / 2
    )
    assert np.isnan(verdicts.loc["off", "gap"]) and verdicts.loc["off", "resamples_in_range"] == 0
    one_vanilla = {"v_hi": "vanilla", "ml_lr": "ml_lr"}
    lone = frontier_verdicts(keyword, ift_loss, one_vanilla, 50, 0.95, 0, ())
    assert lone["verdict"][0].startswith("no frontier")
    # One vanilla arm and the base (lr 0) are a frontier of two points: PCHIP is the line.
    with_base = {"base": "reference", "v_lo": "vanilla", "frozen": "freeze"}
    paired = frontier_verdicts(keyword, ift_loss, with_base, 50, 0.95, 0, ())
    assert paired["gap"][0] == pytest.approx(asr["frozen"] - (asr["v_lo"] + asr["base"]) / 2)
    assert paired["gap_linear"][0] == pytest.approx(paired["gap"][0])
    assert not paired["verdict"][0].startswith("no frontier")


def _headline(rows):
    return pd.DataFrame(
        [(arm, "x", metric, v, v - 0.1, v + 0.1, 10) for arm, metric, v in rows],
        columns=["arm", "benchmark", "metric", "value", "ci_low", "ci_high", "n"],
    )


def _general_domain():
    """A general-domain (Alpaca) part of the paper tables, with its page."""
    from securetune.report.paper_tables import domain_tables

    headline = _headline([
        ("base", "attack_success", 0.05), ("vanilla", "attack_success", 0.40),
        ("ml_lr", "attack_success", 0.25), ("freeze", "attack_success", 0.10),
        ("base", "usability", 0.30), ("vanilla", "usability", 0.35),
        ("ml_lr", "usability", 0.33), ("freeze", "usability", 0.31),
        ("vanilla", "harmfulness_score", 2.5), ("ml_lr", "harmfulness_score", 1.5),
    ])  # fmt: skip
    arms = ["base", "vanilla", "ml_lr", "freeze"]
    kinds = {"base": "reference", "vanilla": "vanilla", "ml_lr": "ml_lr", "freeze": "freeze"}
    paired = {
        "attack_success": (-0.15, -0.2, -0.1),
        "harmfulness_score": (-1.0, -1.4, -0.6),
        "usability": (-0.02, -0.05, 0.01),
    }
    return domain_tables(
        headline, arms, kinds, "general", "alpaca", "usability",
        "meta-llama/Llama-2-7b-chat-hf", paired.__getitem__,
    )  # fmt: skip


PROBE = pd.DataFrame({"layer": [0, 1], "test_accuracy": [0.9, 0.95]})


def test_paper_tables_rows_deltas_and_reported_numbers():
    from securetune.report.paper_tables import markdown

    csv = _general_domain()
    ours = csv[csv["source"] == "ours"].set_index(["row", "metric"])
    assert ours.loc[("ML-LR - vanilla", "attack_success"), "value"] == pytest.approx(-0.15)
    assert ours.loc[("ML-LR - vanilla", "attack_success"), "ci_low"] == pytest.approx(-0.2)
    assert ours.loc[("ML-LR - vanilla", "harmfulness_score"), "value"] == pytest.approx(-1.0)
    assert ours.loc[("ML-LR - vanilla", "usability"), "ci_high"] == pytest.approx(0.01)
    ours = ours["value"]
    assert np.isnan(ours[("before IFT", "harmfulness_score")])  # not judged: n/a, not 0
    reported = csv[csv["source"] == "Du et al. 2024 (reported)"].set_index("metric")["value"]
    assert reported["attack_success"] == pytest.approx(-0.3791)
    assert (csv["source"] == "Qi et al. 2023 (reported)").any()
    page = markdown(csv, PROBE, "meta-llama/Llama-2-7b-chat-hf", 0.95)
    # Rows in the paper's order, the task metric of the general domain, the deltas side by side.
    lines = page.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(f"| {row} "))
             for row in ("before IFT", "vanilla", "ml_lr", "freeze (freeze)")]  # fmt: skip
    assert order == sorted(order)
    assert "usability (ROUGE-L)" in page and "accuracy (GSM8K" not in page
    assert "| ASR (keyword) | -15.00% [-20.00%, -10.00%] | -37.91% |" in page
    assert "0.250 [0.150, 0.350]" in page
    assert "Qi et al. 2023, vanilla benign IFT" in page


def _math_domain(name="math"):
    from securetune.report.paper_tables import domain_tables

    headline = _headline([("vanilla", "task_accuracy", 0.2), ("ml_lr", "task_accuracy", 0.18)])
    return domain_tables(
        headline, ["base", "vanilla", "ml_lr"],
        {"base": "reference", "vanilla": "vanilla", "ml_lr": "ml_lr"},
        name, "gsm8k", "accuracy", "meta-llama/Llama-2-7b-chat-hf",
        lambda metric: (math.nan,) * 3,
    )  # fmt: skip


def test_paper_tables_of_the_math_domain_use_accuracy_and_show_no_qi_numbers():
    from securetune.report.paper_tables import markdown

    page = markdown(_math_domain(), PROBE, "meta-llama/Llama-2-7b-chat-hf", 0.95)
    assert "## Domain: math" in page and "accuracy (GSM8K exact match)" in page
    assert "Qi et al." not in page
    assert "-11.48%" in page


def test_paper_tables_put_each_domain_in_config_order_through_their_csv_files(tmp_path):
    """Each domain's report writes its rows; the paper_tables job reads them back and puts the
    sections on one page, the reported numbers beside the matching setting only."""
    from securetune.report.paper_tables import combine_domains, markdown, read_domain_csv
    from securetune.report.tables import write_csv

    parts = []
    for name, table in (("general", _general_domain()), ("gsm", _math_domain("gsm"))):
        write_csv(table, tmp_path / f"{name}.csv")
        parts.append(read_domain_csv(tmp_path / f"{name}.csv"))
    csv = combine_domains(parts)
    assert list(dict.fromkeys(csv["domain"])) == ["general", "gsm"]
    assert (csv.loc[csv["row"] == "ML-LR - vanilla", "arm"] == "").all()
    page = markdown(csv, PROBE, "meta-llama/Llama-2-7b-chat-hf", 0.95)
    general, gsm = page.index("## Domain: general"), page.index("## Domain: gsm")
    assert general < page.index("Qi et al. 2023, vanilla") < gsm  # Qi: the general setting only
    assert page.index("-37.91%") < gsm < page.index("-11.48%")  # each beside its own setting
    assert page.count("## Probe accuracy per layer") == 1


def test_paired_difference_resamples_the_two_arms_together():
    from securetune.report.stats import paired_difference

    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.5
    # ml_lr differs from vanilla on 10 of 200 prompts, always lower: a paired CI excludes 0,
    # though the two arms' own intervals overlap almost entirely.
    other = base.copy()
    flips = np.flatnonzero(base)[:10]
    other[flips] = False
    keyword = pd.DataFrame({
        "arm": ["vanilla"] * 200 + ["ml_lr"] * 200, "kind": "harmful", "benchmark": "advbench",
        "prompt_id": [f"p{i}" for i in range(200)] * 2,
        "success": np.concatenate([base, other]).astype(float),
    })  # fmt: skip
    mean, low, high = paired_difference(
        {"keyword": keyword}, "attack_success", "ml_lr", "vanilla", 2000, 0.95, 0, ()
    )
    assert mean == pytest.approx(-10 / 200)
    assert low < mean < high < 0
    assert math.isnan(
        paired_difference({"keyword": keyword}, "harmfulness_score", "ml_lr", "vanilla",
                          100, 0.95, 0, ())[0]
    )  # fmt: skip
    # The only benchmark is in the alignment set: nothing left to pool.
    assert math.isnan(
        paired_difference({"keyword": keyword}, "attack_success", "ml_lr", "vanilla",
                          100, 0.95, 0, ("advbench",))[0]
    )  # fmt: skip


def test_frontier_verdicts_leave_the_alignment_benchmarks_out():
    arms = {"v_hi": (1.0, 0.4), "v_lo": (1.3, 0.1), "ml_lr": (1.1, 0.2)}
    kinds = {"v_hi": "vanilla", "v_lo": "vanilla", "ml_lr": "ml_lr"}
    keyword, ift_loss = _frontier_tables(arms, n_prompts=100, n_examples=50)
    # The same prompts again as an in-alignment benchmark where every arm fails to refuse.
    in_alignment = keyword.assign(benchmark="harmbench", success=True)
    both = pd.concat([in_alignment, keyword], ignore_index=True)
    alone = frontier_verdicts(keyword, ift_loss, kinds, 50, 0.95, 0, ())
    apart = frontier_verdicts(both, ift_loss, kinds, 50, 0.95, 0, ("harmbench",))
    pooled = frontier_verdicts(both, ift_loss, kinds, 50, 0.95, 0, ())
    pd.testing.assert_frame_equal(apart, alone)
    assert pooled["attack_success"].iloc[0] > alone["attack_success"].iloc[0]


def test_gamma_ablation_table_orders_gamma_and_goes_under_its_domain():
    from securetune.report.paper_tables import gamma_table, markdown

    headline = _headline([
        ("ml_lr_g1", "attack_success", 0.40), ("ml_lr_g0", "attack_success", 0.10),
        ("ml_lr_g0p1", "attack_success", 0.20), ("ml_lr_g0p1", "heldout_ift_loss", 1.5),
        ("ml_lr_g0", "task_accuracy", 0.05),
    ])  # fmt: skip
    gammas = {"ml_lr_g1": 1.0, "ml_lr_g0": 0.0, "ml_lr_g0p1": 0.1}
    table = gamma_table(headline, gammas, "gsm", "accuracy")
    assert list(dict.fromkeys(table["gamma"])) == [0.0, 0.1, 1.0]
    assert set(table["metric"]) == {
        "harmfulness_score", "attack_success", "task_accuracy", "heldout_ift_loss"
    }  # fmt: skip
    asr = table[table["metric"] == "attack_success"].set_index("gamma")["value"]
    assert asr.to_dict() == pytest.approx({0.0: 0.10, 0.1: 0.20, 1.0: 0.40})
    assert table.loc[table["metric"] == "harmfulness_score", "value"].isna().all()
    page = markdown(_math_domain("gsm"), PROBE, "m", 0.95, table)
    section = page[page.index("### Gamma ablation") : page.index("## Probe accuracy")]
    rows = [
        line for line in section.splitlines() if line.startswith("| 0") or line.startswith("| 1")
    ]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "0.1", "1"]
    assert "0.200 [0.100, 0.300]" in section and "held-out IFT loss" in section
    # No sweep: no section.
    assert "Gamma ablation" not in markdown(_math_domain("gsm"), PROBE, "m", 0.95)


def test_the_frontier_gap_resamples_replicates_before_prompts():
    """Two replicates of ml_lr far apart: the gap's interval covers the seed-to-seed spread,
    which the mean of the replicates alone (one replicate of their average) does not show."""
    arms = {"v_hi": (1.0, 0.4), "v_lo": (1.3, 0.1), "rep0": (1.15, 0.05), "rep1": (1.15, 0.45)}
    keyword, ift_loss = _frontier_tables(arms)
    kinds = {"v_hi": "vanilla", "v_lo": "vanilla", "ml_lr": "ml_lr"}

    def as_replicates(table: pd.DataFrame) -> pd.DataFrame:
        out = table.assign(replicate=table["arm"].map({"rep1": 1}).fillna(0).astype(int))
        return out.assign(arm=out["arm"].replace({"rep0": "ml_lr", "rep1": "ml_lr"}))

    replicated = _pooled(
        frontier_verdicts(as_replicates(keyword), as_replicates(ift_loss), kinds, 400, 0.95, 0)
    ).loc["ml_lr"]
    averaged_keyword = as_replicates(keyword).assign(replicate=0)
    averaged_loss = as_replicates(ift_loss).assign(replicate=0)
    averaged = _pooled(frontier_verdicts(averaged_keyword, averaged_loss, kinds, 400, 0.95, 0)).loc[
        "ml_lr"
    ]
    assert replicated["gap"] == pytest.approx(averaged["gap"])  # same point estimate
    width = replicated["gap_ci_high"] - replicated["gap_ci_low"]
    assert width > 2 * (averaged["gap_ci_high"] - averaged["gap_ci_low"])
    assert replicated["gap_ci_low"] < -0.1 and replicated["gap_ci_high"] > 0.1


def test_replicates_are_drawn_alike_for_every_arm_and_an_unreplicated_arm_is_itself():
    from securetune.report.stats import _replicate_means, per_item_replicates

    rows = pd.DataFrame(
        {"benchmark": "b", "prompt_id": [0, 0, 0, 1, 1, 1],
         "arm": ["ml_lr", "ml_lr", "vanilla"] * 2, "replicate": [0, 1, 0] * 2,
         "success": [0.0, 1.0, 0.5, 0.0, 1.0, 0.5]}
    )  # fmt: skip
    wide = per_item_replicates(rows, "success")
    arms, values = _replicate_means(wide, np.array([1, 1]))
    assert list(arms) == ["ml_lr", "vanilla"]
    assert values[:, 0].tolist() == [1.0, 1.0] and values[:, 1].tolist() == [0.5, 0.5]
    assert _replicate_means(wide, None)[1][:, 0].tolist() == [0.5, 0.5]


def test_the_paired_difference_resamples_replicates_too():
    """Two replicates of an arm, one like the reference and one far from it: the difference's
    interval spans the replicates' disagreement, not just the prompts'."""
    arms = {"vanilla": (1.0, 0.3), "rep0": (1.0, 0.3), "rep1": (1.0, 0.7)}
    keyword, _ = _frontier_tables(arms)
    keyword = keyword.assign(replicate=keyword["arm"].map({"rep1": 1}).fillna(0).astype(int))
    keyword = keyword.assign(arm=keyword["arm"].replace({"rep0": "ml_lr", "rep1": "ml_lr"}))
    mean, low, high = paired_difference(
        {"keyword": keyword}, "attack_success", "ml_lr", "vanilla", 400, 0.95, 0, ()
    )
    assert mean == pytest.approx(0.2, abs=0.02)
    assert low < 0.05 and high > 0.35  # replicate 0 alone: 0; replicate 1 alone: 0.4


@pytest.mark.parametrize("n", [1, 3, 7, 20, 48, 60, 99, 160])
def test_a_wilson_interval_holds_its_rate_at_zero_and_one(n):
    for successes in (0, n):
        low, high = wilson_interval(successes, n, 0.95)
        assert low <= successes / n <= high
    assert wilson_interval(0, n, 0.95)[0] == 0.0 and wilson_interval(n, n, 0.95)[1] == 1.0


def test_with_replicates_wilson_counts_the_prompts_of_one_replicate():
    """Three replicates of the same 20 prompts, every answer 0: the interval is Wilson's for 20
    prompts (up to 0.161), not for 60 rows, which would claim three times the prompts."""
    values = np.zeros(60)
    groups = np.repeat([0, 1, 2], 20)
    mean, low, high = bootstrap_ci(values, 200, 0.95, 0, groups, binary=True)
    assert (mean, low) == (0.0, 0.0)
    assert high == pytest.approx(wilson_interval(0, 20, 0.95)[1])
