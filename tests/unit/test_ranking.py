import numpy as np
import pandas as pd
import pytest
import torch

from securetune.ranking import (
    UNSTABLE_OVERLAP,
    half_stability,
    is_unstable,
    scored_by,
    seed_stability,
    with_replicate,
)
from securetune.report.tables import ranking_stability_section
from securetune.robustness import half_masks


def _table(scores_by_seed: dict[int, list[float]], halves=None) -> pd.DataFrame:
    """A robustness table of layer-0..n q modules; each seed's scores in layer order. The seed
    values are per-module hashes, as in the real table (stable_seed of the module's name)."""
    rows = []
    for s, scores in scores_by_seed.items():
        for layer, score in enumerate(scores):
            rows.append(
                {"layer": layer, "module": "q", "perturbation": "noise", "alpha": 1.0,
                 "seed": 1000 * layer + 7 * s + 3, "score": score}
            )  # fmt: skip
    df = pd.DataFrame(rows)
    if halves is not None:
        df["score_half0"], df["score_half1"] = halves
    return df


def test_replicates_number_each_modules_draws_in_seed_order():
    df = with_replicate(_table({0: [0.1, 0.2], 1: [0.3, 0.4]}))
    assert df.sort_values(["layer", "seed"])["replicate"].tolist() == [0, 1, 0, 1]


def test_seeds_that_agree_give_spearman_one_and_full_overlap():
    pairs = seed_stability(_table({0: [0.1, 0.2, 0.3, 0.4], 1: [0.0, 0.25, 0.5, 0.9]}), k=2)
    assert pairs[["seed_a", "seed_b"]].values.tolist() == [[0, 1]]
    assert pairs["spearman"].iloc[0] == pytest.approx(1.0)
    assert pairs["top_k_overlap"].iloc[0] == 1.0
    assert not is_unstable(pairs)


def test_reversed_seeds_are_unstable():
    pairs = seed_stability(
        _table({0: [0.1, 0.2, 0.3, 0.4], 1: [0.4, 0.3, 0.2, 0.1], 2: [0.1, 0.2, 0.3, 0.4]}), k=2
    )
    assert len(pairs) == 3  # every pair of three seeds
    assert pairs["spearman"].tolist() == pytest.approx([-1.0, 1.0, -1.0])
    assert pairs["top_k_overlap"].tolist() == [0.0, 1.0, 0.0]
    assert pairs["top_k_overlap"].mean() < UNSTABLE_OVERLAP and is_unstable(pairs)


def test_one_seed_has_no_pairs_and_the_report_says_which_key_to_raise():
    table = _table({0: [0.1, 0.2]})
    assert seed_stability(table, k=1).empty
    text = ranking_stability_section(table, {"modules": ["L0.q"]})
    assert "cannot be measured with one seed" in text and "`robustness.seeds`" in text
    assert "not recorded" in text  # no per-half scores in this table


def test_the_report_calls_an_unstable_top_k_unstable():
    table = _table({0: [0.1, 0.2, 0.3, 0.4], 1: [0.4, 0.3, 0.2, 0.1]})
    text = ranking_stability_section(table, {"modules": ["L0.q", "L1.q"]})
    assert "The top-k is unstable" in text and "0.5" in text
    stable = _table({0: [0.1, 0.2, 0.3, 0.4], 1: [0.1, 0.2, 0.3, 0.4]})
    assert "unstable" not in ranking_stability_section(stable, {"modules": ["L0.q", "L1.q"]})


def test_halves_compare_the_scores_on_disjoint_prompts():
    halves = ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    result = half_stability(_table({0: [0.1, 0.2, 0.3, 0.4]}, halves), k=2)
    assert result == {"spearman": pytest.approx(-1.0), "top_k_overlap": 0.0}
    assert half_stability(_table({0: [0.1]}), k=1) is None


def test_half_masks_split_each_class_and_cover_every_prompt_once():
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])
    first, second = half_masks(labels)
    assert not (first & second).any() and (first | second).all()
    for half in (first, second):
        assert set(labels[half].tolist()) == {0, 1}
    assert np.array_equal(first.nonzero().flatten().numpy(), [0, 2, 4, 6, 8])


def test_scored_by_reads_the_named_column_and_refuses_a_missing_one():
    table = _table({0: [0.1, 0.2]}, halves=([0.5, 0.4], [0.0, 0.0]))
    assert scored_by(table, "score_half0", "x")["score"].tolist() == [0.5, 0.4]
    assert scored_by(table, "score", "x")["score"].tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="search.probe_split: halves needs .* score_half0"):
        scored_by(_table({0: [0.1]}), "score_half0", "search.probe_split: halves")
