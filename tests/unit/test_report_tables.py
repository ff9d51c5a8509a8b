"""Headline metrics of the main table and the bootstrap over prompts and seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from securetune.report import bootstrap_ci, headline_rates, headline_table


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
    ]
    row = table.set_index("arm").loc["vanilla"]
    assert row["harmfulness_score"] == "n/a" and row["unsafe_rate"] == "n/a"
    assert row["task_accuracy"] == "n/a"  # no math benchmark configured
    assert row["attack_success"].startswith("0.875 [")
