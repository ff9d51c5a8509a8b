"""The robustness ranking and how far to trust it: the order the search grows Mods_Robust in, and
its stability between noise seeds (Spearman of the per-module scores, overlap of the top k).

A ranking is only worth acting on if another seed would give about the same one; the report
says so plainly when it would not. Torch-free, so the report reads it without loading a model.
"""

from __future__ import annotations

from itertools import combinations

import pandas as pd

from securetune.architectures import MODULE_TYPES, module_name

# Below this mean top-k overlap between seeds the report calls the top-k unstable: under half
# of Mods_Robust would survive a change of seed, so which modules get the large rate is chance.
UNSTABLE_OVERLAP = 0.5


def module_scores(robustness: pd.DataFrame) -> pd.DataFrame:
    """Mean score per module (over every row given), with its name and the type order that
    breaks ties; columns layer, module, name, score, type_order."""
    mean = robustness.groupby(["layer", "module"], as_index=False)["score"].mean()
    mean["type_order"] = mean["module"].map(MODULE_TYPES.index)
    mean["name"] = [module_name(int(r.layer), r.module) for r in mean.itertuples()]
    return mean


def scored_by(robustness: pd.DataFrame, column: str, needed_by: str) -> pd.DataFrame:
    """The table with its `score` read from `column` (a plan's `ranked_by`: the first half's
    score under `search.probe_split: halves`), refused by name, with what needs it, when the
    table lacks the column."""
    if column not in robustness.columns:
        raise ValueError(
            f"{needed_by} needs the robustness table's {column} column; rerun the robustness stage"
        )
    return robustness.assign(score=robustness[column])


def rank_modules(robustness: pd.DataFrame) -> list[str]:
    """Module names, most robust (lowest mean score) first; ties by layer, then type order."""
    mean = module_scores(robustness)
    mean = mean.sort_values(["score", "layer", "type_order"], kind="mergesort")
    return mean["name"].tolist()


def with_replicate(robustness: pd.DataFrame) -> pd.DataFrame:
    """The table with a `replicate` column: each module's draws numbered 0, 1, ... in seed order
    within its (perturbation, alpha). The table's seed is derived per module (crc32 of the
    module's name and the draw), so equal seeds do not mark one run across modules; each
    module's draws are independent, so any numbering splits them into valid runs (and the ift
    perturbation's seeds, shared by every module, number the same run alike)."""
    df = robustness.copy()
    df["replicate"] = (
        df.groupby(["layer", "module", "perturbation", "alpha"], dropna=False)["seed"]
        .rank(method="first")
        .astype(int)
        - 1
    )
    return df


def scores_by_replicate(robustness: pd.DataFrame) -> pd.DataFrame:
    """Mean score per module (rows, by name) and replicate (columns), over perturbations and
    alphas, as the search averages them."""
    df = with_replicate(robustness)
    per = df.groupby(["replicate", "layer", "module"], as_index=False)["score"].mean()
    per["name"] = [module_name(int(r.layer), r.module) for r in per.itertuples()]
    return per.pivot(index="name", columns="replicate", values="score")


def top_k(robustness: pd.DataFrame, k: int) -> set[str]:
    return set(rank_modules(robustness)[:k])


def seed_stability(robustness: pd.DataFrame, k: int) -> pd.DataFrame:
    """One row per pair of replicates (seeds): the Spearman correlation of the per-module scores
    and the share of the top k (most robust) modules the two share. Empty with one replicate."""
    df = with_replicate(robustness)
    scores = scores_by_replicate(robustness)
    rows = []
    for a, b in combinations(sorted(scores.columns), 2):
        tops = [top_k(df[df["replicate"] == r], k) for r in (a, b)]
        rows.append(
            {
                "seed_a": int(a),
                "seed_b": int(b),
                "spearman": float(scores[a].corr(scores[b], method="spearman")),
                "top_k_overlap": len(tops[0] & tops[1]) / k if k else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["seed_a", "seed_b", "spearman", "top_k_overlap"])


def is_unstable(pairs: pd.DataFrame) -> bool:
    """The top k is unstable when the mean overlap between seeds is below UNSTABLE_OVERLAP."""
    return bool(pairs["top_k_overlap"].mean() < UNSTABLE_OVERLAP)


def half_stability(robustness: pd.DataFrame, k: int) -> dict[str, float] | None:
    """The Spearman correlation of the per-module scores computed on the two halves of the
    probe's test prompts, and the overlap of their top k; None for a table recorded before the
    halves were (no score_half columns)."""
    if not {"score_half0", "score_half1"} <= set(robustness.columns):
        return None
    halves = [robustness.assign(score=robustness[f"score_half{i}"]) for i in (0, 1)]
    scores = [module_scores(h).set_index("name")["score"] for h in halves]
    tops = [top_k(h, k) for h in halves]
    return {
        "spearman": float(scores[0].corr(scores[1], method="spearman")),
        "top_k_overlap": len(tops[0] & tops[1]) / k if k else float("nan"),
    }
