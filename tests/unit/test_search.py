import pandas as pd

from securetune.search import greedy_search, module_groups, rank_groups, rank_modules


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
