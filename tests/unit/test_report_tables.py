"""Headline metrics of the main table and the bootstrap over prompts and seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from securetune.report import (
    bootstrap_ci,
    frontier_verdicts,
    headline_rates,
    headline_table,
)


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
    rates = headline_rates({"keyword": _keyword(), "guard": guard}, 500, 0.95, 0)
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
        "over_refusal",
        "usability",
        "task_accuracy",
        "heldout_ift_loss",
    ]
    row = table.set_index("arm").loc["vanilla"]
    assert row["harmfulness_score"] == "n/a" and row["unsafe_rate"] == "n/a"
    assert row["task_accuracy"] == "n/a"  # no math benchmark configured
    assert row["attack_success"].startswith("0.875 [")


def _point(arm, loss, attack):
    return [
        {"arm": arm, "metric": "heldout_ift_loss", "value": loss, "ci_low": loss, "ci_high": loss},
        {"arm": arm, "metric": "attack_success", "value": attack, "ci_low": 0.0, "ci_high": 1.0},
    ]


def test_ml_lr_is_judged_against_the_vanilla_frontier_at_its_own_loss():
    # Vanilla at three learning rates: lower lr, higher loss, lower attack success.
    rows = _point("v_hi", 1.0, 0.4) + _point("v_mid", 1.1, 0.3) + _point("v_lo", 1.3, 0.1)
    rows += _point("ml_lr", 1.05, 0.2) + _point("worse", 1.2, 0.3) + _point("off", 0.9, 0.0)
    rows += _point("base", 1.5, 0.05)
    kinds = {"base": "reference", "v_hi": "vanilla", "v_mid": "vanilla", "v_lo": "vanilla"}
    kinds |= {"ml_lr": "ml_lr", "worse": "ml_lr", "off": "freeze"}
    verdicts = frontier_verdicts(pd.DataFrame(rows), kinds).set_index("arm")
    assert list(verdicts.index) == ["ml_lr", "worse", "off"]
    assert verdicts.loc["ml_lr", "gap"] == pytest.approx(0.2 - 0.35)
    assert verdicts.loc["ml_lr", "verdict"].startswith("below")
    assert verdicts.loc["worse", "gap"] == pytest.approx(0.3 - 0.2)
    assert verdicts.loc["worse", "verdict"].startswith("on or above")
    assert verdicts.loc["off", "verdict"] == "outside the vanilla arms' loss range"
    one_vanilla = {"v_hi": "vanilla", "ml_lr": "ml_lr"}
    assert frontier_verdicts(pd.DataFrame(rows), one_vanilla)["verdict"][0].startswith(
        "no frontier"
    )
