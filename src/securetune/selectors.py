"""The control module sets: which modules an arm trains at lr when not the search's Mods_Robust.

ML-LR's claim is that *which* modules train at lr matters. It is tested only against sets of the
same size chosen otherwise, trained with the same gamma:

- `random`: as many modules as Mods_Robust, drawn uniformly (seeded, one file per draw), among
  draws whose parameter count is within `random_param_tolerance` of Mods_Robust's (the closest
  of the draws when none is), so a random set is not smaller or larger by chance of type;
- `inverse`: the least robust modules of the same robustness ranking;
- `attribution`: the modules with the smallest share of safety-critical weights, by Wei et al.
  2024's SNIP set difference (`securetune.attribution`): the most safety-critical modules are
  left at lr * gamma, as their method would protect them.

Each writes a plan like the search's (`modules` is what the trainer reads), with the parameter
counts beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open

from securetune.architectures import module_weight_name, parse_module_name
from securetune.io import stable_seed, versions, write_json
from securetune.method import selection_parts
from securetune.ranking import rank_modules, scored_by
from securetune.settings import SelectorSettings
from securetune.weight_links import check_linked_weights

log = logging.getLogger(__name__)

# Draws tried for a random set within the parameter tolerance; the closest is kept otherwise.
RANDOM_TRIES = 10_000


def tensor_sizes(model: Path) -> dict[str, int]:
    """Each saved tensor's element count, read from the safetensors headers (no weights are
    loaded)."""
    check_linked_weights(model)
    sizes: dict[str, int] = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                sizes[key] = int(np.prod(f.get_slice(key).get_shape()))
    return sizes


def parameter_count(model: Path) -> int:
    """The model's parameters as saved: a tied LM head is stored, and so counted, once."""
    return sum(tensor_sizes(model).values())


def module_sizes(model: Path, names: list[str]) -> dict[str, int]:
    """Each module's weight count, read from the safetensors headers."""
    model_type = json.loads((model / "config.json").read_text())["model_type"]
    wanted = {module_weight_name(model_type, *parse_module_name(n)): n for n in names}
    saved = tensor_sizes(model)
    sizes = {name: saved[key] for key, name in wanted.items() if key in saved}
    missing = sorted(set(names) - set(sizes))
    if missing:
        raise ValueError(f"{model}: no weights for module(s) {missing[:5]}")
    return sizes


def random_selection(
    candidates: list[str], sizes: dict[str, int], k: int, target: int, tolerance: float, seed: int
) -> list[str]:
    """`k` modules drawn uniformly, redrawn until their parameter count is within `tolerance`
    (a share) of `target`; the closest draw when no draw of `RANDOM_TRIES` is."""
    if k > len(candidates):
        raise ValueError(f"cannot draw {k} modules from {len(candidates)}")
    rng = np.random.default_rng(seed)
    best, best_miss = [], float("inf")
    for _ in range(RANDOM_TRIES):
        drawn = [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]
        miss = abs(sum(sizes[m] for m in drawn) - target) / max(target, 1)
        if miss < best_miss:
            best, best_miss = drawn, miss
        if miss <= tolerance:
            break
    return sorted(best, key=candidates.index)


def inverse_selection(robustness: pd.DataFrame, k: int) -> list[str]:
    """The `k` least robust modules (highest score): the robust ranking read from its end."""
    return rank_modules(robustness)[::-1][:k]


def attribution_ranking(attribution: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The candidate modules by the safety importance their safety-critical weights carry,
    least first (ties: most utility importance, then name), so the first k are those Wei et
    al. would least protect."""
    table = attribution[attribution["module_name"].isin(candidates)].sort_values(
        ["safety_critical_importance", "utility_importance", "module_name"],
        ascending=[True, False, True],
        kind="mergesort",
    )
    return table["module_name"].tolist()


def selected_modules(
    settings: SelectorSettings,
    robust: list[str],
    robustness: pd.DataFrame,
    sizes: dict[str, int],
    attribution: pd.DataFrame | None,
) -> list[str]:
    """The selection's module set, as many modules as Mods_Robust."""
    k = len(robust)
    if settings.selection == "inverse":
        return inverse_selection(robustness, k)
    if settings.selection == "attribution":
        if attribution is None:
            raise ValueError("the attribution selector needs the attribution table")
        return attribution_ranking(attribution, rank_modules(robustness))[:k]
    selector, draw = selection_parts(settings.selection)
    if selector == "random":
        return random_selection(
            rank_modules(robustness),
            sizes,
            k,
            sum(sizes[m] for m in robust),
            settings.random_param_tolerance or 0.0,
            stable_seed(settings.seed, "random_selector", draw),
        )
    raise ValueError(f"unknown selection '{settings.selection}'")


def select_modules(
    *,
    model: Path,
    plan: Path,
    robustness: Path,
    attribution: Path | None,
    out: Path,
    settings: SelectorSettings,
) -> None:
    """Stage `select_modules`: a control set of Mods_Robust's size, written as a plan."""
    search = json.loads(plan.read_text())
    robust = search["modules"]
    # The inverse reads the ranking the search read (the first half's score with probe_split
    # halves); plans written before the split was an option ranked by `score`.
    table = pd.read_parquet(robustness)
    table = scored_by(table, search.get("ranked_by", "score"), f"{plan}'s ranked_by")
    candidates = rank_modules(table)
    sizes = module_sizes(model, candidates)
    chosen = selected_modules(
        settings,
        robust,
        table,
        sizes,
        pd.read_parquet(attribution) if attribution is not None else None,
    )
    total = sum(sizes.values())
    log.info("%s (%d modules): %s", settings.selection, len(chosen), chosen)
    write_json(
        {
            "modules": chosen,
            "selector": selection_parts(settings.selection)[0],
            "selection": settings.selection,
            "size": len(chosen),
            "params": sum(sizes[m] for m in chosen),
            "params_share": sum(sizes[m] for m in chosen) / total,
            "robust_params": sum(sizes[m] for m in robust),
            "overlap_with_robust": len(set(chosen) & set(robust)),
            "random_param_tolerance": settings.random_param_tolerance,
            "seed": settings.seed,
            "versions": versions(),
        },
        out,
    )
