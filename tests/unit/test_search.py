import pandas as pd

from securetune.search import greedy_search, rank_modules


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
