"""Stage 5: grow Mods_Robust greedily, most robust module first, checking the probe each time.

Modules that are each robust alone may not be robust together, so every candidate set is
perturbed jointly; the search stops when the probe's accuracy falls below tau or the set reaches
its size budget.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from securetune.architectures import MODULE_TYPES, module_name


def rank_modules(robustness: pd.DataFrame) -> list[str]:
    """Module names, most robust (lowest mean score) first; ties by layer, then type order."""
    mean = robustness.groupby(["layer", "module"], as_index=False)["score"].mean()
    mean["type_order"] = mean["module"].map(MODULE_TYPES.index)
    mean = mean.sort_values(["score", "layer", "type_order"], kind="mergesort")
    return [module_name(int(r.layer), r.module) for r in mean.itertuples()]


def greedy_search(
    ranked: list[str],
    evaluate: Callable[[list[str]], float],
    tau: float,
    max_modules: int,
) -> tuple[list[str], pd.DataFrame, str]:
    """Return (selected modules, trace, stop reason).

    The trace has one row per evaluated set: size, the module added, probe accuracy, and
    whether it was kept. The first row is the unperturbed model.
    """
    selected: list[str] = []
    rows = [{"step": 0, "size": 0, "added": "", "probe_accuracy": evaluate([]), "accepted": True}]
    reason = "exhausted"
    for step, candidate in enumerate(ranked, start=1):
        if len(selected) >= max_modules:
            reason = "budget"
            break
        accuracy = evaluate([*selected, candidate])
        accepted = accuracy >= tau
        rows.append(
            {
                "step": step,
                "size": len(selected) + 1,
                "added": candidate,
                "probe_accuracy": accuracy,
                "accepted": accepted,
            }
        )
        if not accepted:
            reason = "tau"
            break
        selected.append(candidate)
    return selected, pd.DataFrame(rows), reason
