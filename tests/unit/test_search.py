import pandas as pd
import pytest

from securetune.config import ConfigError
from securetune.search import (
    greedy_search,
    module_budget,
    module_groups,
    param_budget,
    rank_groups,
    rank_modules,
    search_robust_modules,
)
from securetune.settings import SearchSettings
from tests.unit.test_device_placement import (  # noqa: F401 (probe_inputs: a fixture)
    probe_inputs,
    probe_view,
    robustness_settings,
)


def test_ranking_is_most_robust_first_with_stable_ties():
    df = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1, 0, 0],
            "module": ["q", "k", "q", "k", "q", "k"],
            "score": [0.2, 0.0, 0.0, 0.5, 0.2, 0.0],
        }
    )
    assert rank_modules(df) == ["L0.k", "L1.q", "L0.q", "L1.k"]


def test_search_stops_below_tau_and_keeps_what_passed():
    accuracy = {0: 0.9, 1: 0.85, 2: 0.8, 3: 0.6}
    selected, trace, reason = greedy_search(
        ["a", "b", "c", "d"], lambda s: accuracy[len(s)], tau=0.7, max_modules=10
    )
    assert selected == ["a", "b"]
    assert reason == "tau"
    assert trace["accepted"].tolist() == [True, True, True, False]
    assert trace["probe_accuracy"].tolist() == [0.9, 0.85, 0.8, 0.6]


def test_search_stops_at_budget():
    selected, trace, reason = greedy_search(["a", "b", "c"], lambda s: 1.0, tau=0.5, max_modules=2)
    assert selected == ["a", "b"] and reason == "budget"


def test_search_evaluates_sets_jointly():
    seen = []
    greedy_search(["a", "b"], lambda s: seen.append(list(s)) or 1.0, tau=0.0, max_modules=5)
    assert seen == [[], ["a"], ["a", "b"]]


def _table(layers: int, types: list[str], score) -> pd.DataFrame:
    rows = [
        {"layer": layer, "module": m, "score": score(layer, m)}
        for layer in range(layers)
        for m in types
    ]
    return pd.DataFrame(rows)


def test_groups_are_type_by_depth_band():
    groups = module_groups(_table(5, ["q", "down"], lambda layer, m: 0.0), band_width=2)
    assert groups == {
        "q@L0-1": ["L0.q", "L1.q"],
        "down@L0-1": ["L0.down", "L1.down"],
        "q@L2-3": ["L2.q", "L3.q"],
        "down@L2-3": ["L2.down", "L3.down"],
        "q@L4-4": ["L4.q"],
        "down@L4-4": ["L4.down"],
    }


def test_group_search_ranks_by_mean_score_and_grows_by_whole_groups():
    # down is robust (low score) in deep layers, q everywhere is fragile.
    table = _table(4, ["q", "down"], lambda layer, m: 1.0 if m == "q" else 0.1 * (4 - layer))
    ranked, members = rank_groups(table, band_width=2)
    assert ranked == ["down@L2-3", "down@L0-1", "q@L0-1", "q@L2-3"]
    seen = []

    def evaluate(names):
        seen.append(sorted(names))
        return 1.0 - 0.3 * sum(name.endswith(".q") for name in names)

    selected, trace, reason = greedy_search(ranked, evaluate, 0.5, 10, members)
    assert selected == ["L2.down", "L3.down", "L0.down", "L1.down"]
    assert reason == "tau"
    assert seen[1] == ["L2.down", "L3.down"]  # a group is perturbed as a whole
    assert trace["size"].tolist() == [0, 2, 4, 6]
    assert trace["n_units"].tolist() == [0, 1, 2, 3]
    assert trace["added"].tolist() == ["", "down@L2-3", "down@L0-1", "q@L0-1"]


def test_group_search_stops_before_the_budget_is_exceeded():
    table = _table(4, ["q"], lambda layer, m: layer)
    ranked, members = rank_groups(table, band_width=3)
    selected, _, reason = greedy_search(ranked, lambda s: 1.0, 0.5, 2, members)
    assert selected == [] and reason == "budget"  # the first group has 3 modules > 2


def _accuracy_without(fragile: set[str], clean: float = 0.9, cost: float = 0.2):
    """A fake probe: `clean` accuracy, less `cost` for each fragile module in the set."""
    return lambda names: clean - cost * sum(name in fragile for name in names)


def test_stop_ends_the_search_at_the_first_set_below_the_floor():
    selected, trace, reason = greedy_search(
        ["a", "b", "c"], _accuracy_without({"b"}), tau=0.8, max_modules=10
    )
    assert selected == ["a"] and reason == "tau"
    assert trace["added"].tolist() == ["", "a", "b"]  # c is never tried


def test_skip_passes_over_a_rejected_unit_and_goes_down_the_ranking():
    selected, trace, reason = greedy_search(
        ["a", "b", "c", "d"], _accuracy_without({"b"}), tau=0.8, max_modules=10, on_reject="skip"
    )
    assert selected == ["a", "c", "d"] and reason == "exhausted"
    assert trace["added"].tolist() == ["", "a", "b", "c", "d"]
    assert trace["accepted"].tolist() == [True, True, False, True, True]
    # the set after a skip is the kept modules plus the next unit, without the skipped one
    assert trace["added_modules"].tolist()[3] == "c" and trace["size"].tolist()[3] == 2


def test_skip_still_stops_at_the_budget():
    selected, trace, reason = greedy_search(
        ["a", "b", "c", "d"], _accuracy_without({"a"}), tau=0.8, max_modules=2, on_reject="skip"
    )
    assert selected == ["b", "c"] and reason == "budget"
    assert trace["accepted"].tolist() == [True, False, True, True]


def test_relative_tau_is_a_drop_below_the_clean_accuracy():
    # tau 0.5 (chance) alone never binds; a drop of 0.1 below the clean 0.9 does.
    evaluate = _accuracy_without({"b"}, clean=0.9, cost=0.15)
    kept, _, reason = greedy_search(["a", "b", "c"], evaluate, tau=0.5, max_modules=10)
    assert kept == ["a", "b", "c"] and reason == "exhausted"
    kept, trace, reason = greedy_search(
        ["a", "b", "c"], evaluate, tau=0.5, max_modules=10, tau_drop=0.1
    )
    assert kept == ["a"] and reason == "tau"
    assert trace["accuracy_floor"].iloc[0] == pytest.approx(0.8)


def test_the_absolute_tau_still_binds_when_above_the_relative_floor():
    evaluate = _accuracy_without({"b"}, clean=0.9, cost=0.15)
    kept, trace, _ = greedy_search(["a", "b"], evaluate, tau=0.8, max_modules=10, tau_drop=0.5)
    assert kept == ["a"] and trace["accuracy_floor"].iloc[0] == 0.8


def test_parameter_budget_stops_before_a_module_that_would_exceed_it():
    sizes = {"a": 10, "b": 30, "c": 5}
    kept, trace, reason = greedy_search(
        ["a", "b", "c"], lambda s: 1.0, 0.5, 10, sizes=sizes, max_params=35
    )
    # b would bring 40 > 35 parameters; c would fit but comes after b in the ranking
    assert kept == ["a"] and reason == "budget"
    assert trace["params"].tolist() == [0, 10]


def test_parameter_budget_needs_sizes():
    with pytest.raises(ValueError, match="sizes"):
        greedy_search(["a"], lambda s: 1.0, 0.5, 10, max_params=3)


def test_budgets_from_shares_round_down_and_keep_the_smaller():
    assert module_budget(max_modules=10, max_module_share=1.0, n_scored=28) == 10
    assert module_budget(max_modules=10, max_module_share=0.25, n_scored=28) == 7
    assert param_budget(1.0, {"a": 10, "b": 30}) is None
    assert param_budget(0.3, {"a": 10, "b": 30, "c": 5}) == 13


def test_search_settings_refuse_an_unknown_on_reject_and_a_share_out_of_range(config):
    config["search"]["on_reject"] = "ignore"
    with pytest.raises(ConfigError, match="on_reject"):
        SearchSettings.from_config(config)
    config["search"].update(on_reject="skip", max_param_share=0)
    with pytest.raises(ConfigError, match="max_param_share"):
        SearchSettings.from_config(config)


def test_the_stage_plan_records_the_floor_the_budgets_and_the_parameter_share(
    probe_inputs,  # noqa: F811 (the fixture imported above)
    tmp_path,
):
    import json

    settings = SearchSettings(
        tau=0.0, max_modules=50, alpha=0.5, seeds=1, robustness=robustness_settings(),
        tau_drop=1.0, on_reject="skip", max_module_share=0.5, max_param_share=0.7,
    )  # fmt: skip
    search_robust_modules(
        **probe_view(probe_inputs),
        robustness=probe_inputs["robustness"],
        ift_set=None,
        out_plan=tmp_path / "plan.json",
        out_trace=tmp_path / "trace.parquet",
        settings=settings,
    )  # fmt: skip
    plan = json.loads((tmp_path / "plan.json").read_text())
    scored = len(plan["ranking"])
    assert plan["module_budget"] == scored // 2
    assert plan["on_reject"] == "skip" and plan["max_param_share"] == 0.7
    assert plan["accuracy_floor"] == max(0.0, plan["clean_accuracy"] - 1.0)
    assert plan["n_params"] > 0 and 0 < plan["param_share"] <= 0.7
    assert plan["param_budget"] >= plan["n_params"]
    assert plan["model_param_share"] < plan["param_share"]  # embeddings count in the model
    assert plan["stop_reason"] == "budget"


def test_halves_rank_by_the_first_half_and_check_sets_on_the_second(
    probe_inputs,  # noqa: F811 (the fixture imported above)
    tmp_path,
):
    import json

    from securetune.ranking import rank_modules as ranking_of
    from securetune.robustness import half_masks, open_probe_view

    settings = SearchSettings(
        tau=0.0, max_modules=50, alpha=0.5, seeds=1, robustness=robustness_settings(),
        probe_split="halves",
    )  # fmt: skip
    search_robust_modules(
        **probe_view(probe_inputs),
        robustness=probe_inputs["robustness"],
        ift_set=None,
        out_plan=tmp_path / "plan.json",
        out_trace=tmp_path / "trace.parquet",
        settings=settings,
    )  # fmt: skip
    plan = json.loads((tmp_path / "plan.json").read_text())
    table = pd.read_parquet(probe_inputs["robustness"])
    assert plan["probe_split"] == "halves" and plan["ranked_by"] == "score_half0"
    assert plan["ranking"] == ranking_of(table.assign(score=table["score_half0"]))
    view = open_probe_view(
        **probe_view(probe_inputs), settings=settings.robustness.features
    )  # fmt: skip
    second = half_masks(view.labels)[1]
    assert plan["search_prompts"] == int(second.sum()) < len(view.labels)
    half = view.subset(second)
    assert plan["clean_accuracy"] == pytest.approx(half.accuracy(half.clean))


def test_probe_split_is_checked(config):
    config["search"]["probe_split"] = "thirds"
    with pytest.raises(ConfigError, match="probe_split"):
        SearchSettings.from_config(config)


def test_a_unit_without_a_score_is_ranked_last():
    """proxy_reach reachable leaves modules above every proxy layer without a score (NaN):
    they go to the end of the ranking, not wherever NaN's comparisons put them."""
    table = _table(3, ["q"], lambda layer, m: float("nan") if layer == 0 else 1.0 / layer)
    ranked, _ = rank_groups(table, band_width=1)
    assert ranked == ["q@L2-2", "q@L1-1", "q@L0-0"]
