"""Stage 5: grow Mods_Robust greedily, most robust unit first, checking the probe each time.

Modules that are each robust alone may not be robust together, so every candidate set is
perturbed jointly; the search stops when the probe's accuracy falls below tau or the set would
exceed its size budget. A unit is one module, or a group: one module type in a band of
consecutive layers, since the paper finds robustness varies regularly with type and depth (a
group also needs far fewer joint evaluations than its modules one by one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from securetune.architectures import MODULE_TYPES, module_name, parse_module_name
from securetune.finetune.sft_data import Example
from securetune.io import (
    model_revision,
    provenance,
    stable_seed,
    versions,
    write_json,
    write_parquet,
)
from securetune.precision import detect
from securetune.progress import Progress
from securetune.robustness import ProbeView, ift_examples, open_probe_view, perturbed
from securetune.settings import SearchSettings

log = logging.getLogger(__name__)


def rank_modules(robustness: pd.DataFrame) -> list[str]:
    """Module names, most robust (lowest mean score) first; ties by layer, then type order."""
    mean = robustness.groupby(["layer", "module"], as_index=False)["score"].mean()
    mean["type_order"] = mean["module"].map(MODULE_TYPES.index)
    mean = mean.sort_values(["score", "layer", "type_order"], kind="mergesort")
    return [module_name(int(r.layer), r.module) for r in mean.itertuples()]


def group_name(module: str, first: int, last: int) -> str:
    """`gate@L4-7`: module type gate in layers 4..7."""
    return f"{module}@L{first}-{last}"


def module_groups(robustness: pd.DataFrame, band_width: int) -> dict[str, list[str]]:
    """Group -> its module names: each scored module type in bands of `band_width` layers
    (the last band may be narrower), in (band, type) order."""
    if band_width < 1:
        raise ValueError(f"search.band_width must be >= 1, got {band_width}")
    layers = sorted(int(x) for x in robustness["layer"].unique())
    types = [m for m in MODULE_TYPES if m in set(robustness["module"])]
    top = max(layers)
    groups: dict[str, list[str]] = {}
    for first in range(0, top + 1, band_width):
        band = [layer for layer in layers if first <= layer < first + band_width]
        if not band:
            continue
        for module in types:
            last = min(first + band_width - 1, top)
            groups[group_name(module, first, last)] = [module_name(x, module) for x in band]
    return groups


def rank_groups(
    robustness: pd.DataFrame, band_width: int
) -> tuple[list[str], dict[str, list[str]]]:
    """(group names, most robust first by the mean score of their modules; the groups)."""
    groups = module_groups(robustness, band_width)
    per_module = robustness.groupby(["layer", "module"])["score"].mean()
    score = {
        name: float(sum(per_module[parse_module_name(m)] for m in members) / len(members))
        for name, members in groups.items()
    }
    order = list(groups)  # (band, type) order breaks ties
    return sorted(order, key=lambda g: (score[g], order.index(g))), groups


def greedy_search(
    ranked: list[str],
    evaluate: Callable[[list[str]], float],
    tau: float,
    max_modules: int,
    members: dict[str, list[str]] | None = None,
) -> tuple[list[str], pd.DataFrame, str]:
    """Return (selected modules, trace, stop reason: tau, budget or exhausted).

    `ranked` are units, most robust first; `members` maps a group to its modules (None: every
    unit is one module). `evaluate` gets the candidate set's module names and returns the
    probe accuracy with all of them perturbed jointly. The trace has one row per evaluated set
    (the first is the unperturbed model): size in modules, units, the unit added, probe accuracy,
    and whether it was kept.
    """

    def modules_of(unit: str) -> list[str]:
        return [unit] if members is None else list(members[unit])

    selected: list[str] = []
    units: list[str] = []
    rows = [
        {
            "step": 0,
            "size": 0,
            "n_units": 0,
            "added": "",
            "added_modules": "",
            "probe_accuracy": evaluate([]),
            "accepted": True,
        }
    ]
    reason = "exhausted"
    for step, candidate in enumerate(ranked, start=1):
        new = modules_of(candidate)
        if len(selected) + len(new) > max_modules:
            reason = "budget"
            break
        accuracy = evaluate([*selected, *new])
        accepted = accuracy >= tau
        rows.append(
            {
                "step": step,
                "size": len(selected) + len(new),
                "n_units": len(units) + 1,
                "added": candidate,
                "added_modules": ",".join(new),
                "probe_accuracy": accuracy,
                "accepted": accepted,
            }
        )
        if not accepted:
            reason = "tau"
            break
        selected += new
        units.append(candidate)
    return selected, pd.DataFrame(rows), reason


# --- the stage ------------------------------------------------------------------------------------


def search_robust_modules(
    *,
    model: Path,
    probe_set: Path,
    features: Path,
    probes: Path,
    proxy: Path,
    robustness: Path,
    ift_set: Path | None,
    out_plan: Path,
    out_trace: Path,
    settings: SearchSettings,
) -> None:
    """Stage `search_robust_modules`: greedy search over modules or groups, each candidate set
    perturbed jointly `settings.seeds` times and scored by the mean proxy-layer probe accuracy;
    writes the plan (JSON) and the trace (Parquet)."""
    view = open_probe_view(
        model=model, probe_set=probe_set, features=features, probes=probes, proxy=proxy,
        settings=settings.robustness.features,
    )  # fmt: skip
    if settings.robustness.cached_prefix:
        view.cache_layers(list(range(view.model.config.num_hidden_layers)))
    examples = None
    if settings.perturbation == "ift":
        if ift_set is None:
            raise ValueError("search.perturbation ift: the job needs the IFT set")
        examples = ift_examples(model, ift_set, settings.robustness.ift)
    table = pd.read_parquet(robustness)
    if settings.unit == "group":
        ranked, members = rank_groups(table, settings.band_width)
    else:
        ranked, members = rank_modules(table), None
    selected, trace, reason = greedy_search(
        ranked,
        with_progress(joint_accuracy(view, settings, examples), len(ranked), settings),
        settings.tau,
        settings.max_modules,
        members,
    )
    log.info("Mods_Robust (%d, stopped by %s): %s", len(selected), reason, selected)
    seed = settings.robustness.seed
    trace["seed"] = seed
    trace["unit"] = settings.unit
    trace["perturbation"] = settings.perturbation
    trace["tau"] = settings.tau
    write_parquet(trace, out_trace, provenance(seed, model))
    accepted = trace.loc[trace["accepted"] & (trace["step"] > 0), "added"].tolist()
    write_json(search_plan(selected, accepted, reason, ranked, view, settings, model), out_plan)


def with_progress(
    evaluate: Callable[[list[str]], float], n_units: int, settings: SearchSettings
) -> Callable[[list[str]], float]:
    """`evaluate`, logging progress: the total counts every set the search could try (it may stop
    earlier at tau), so the ETA is an upper bound."""
    progress = Progress(
        "search (at most)", min(n_units, settings.max_modules) + 1, log, unit="candidate sets"
    )

    def logged(names: list[str]) -> float:
        accuracy = evaluate(names)
        progress.update()
        return accuracy

    return logged


def joint_accuracy(
    view: ProbeView, settings: SearchSettings, examples: list[Example] | None
) -> Callable[[list[str]], float]:
    """The probe accuracy with a candidate set's modules perturbed together, averaged over
    `settings.seeds` draws (the clean accuracy for the empty set)."""

    def evaluate(names: list[str]) -> float:
        if not names:
            return view.accuracy(view.clean)
        modules = [parse_module_name(n) for n in names]
        lowest = min(layer for layer, _ in modules)
        accuracies = []
        for s in range(settings.seeds):
            with perturbed(
                view,
                modules,
                settings.perturbation,
                alpha=settings.alpha,
                seed=stable_seed(settings.robustness.seed, "search", settings.perturbation, s),
                ift=settings.robustness.ift,
                ift_examples=examples,
            ):
                accuracies.append(view.accuracy(view.features(lowest)))
        return float(sum(accuracies) / len(accuracies))

    return evaluate


def search_plan(
    selected: list[str],
    accepted_units: list[str],
    reason: str,
    ranked: list[str],
    view: ProbeView,
    settings: SearchSettings,
    model: Path,
) -> dict:
    """The plan file: Mods_Robust, how the search reached it, and what it was computed with."""
    rob = settings.robustness
    noise, ift, groups = (
        settings.perturbation == "noise",
        settings.perturbation == "ift",
        settings.unit == "group",
    )
    return {
        "modules": selected,
        "groups": accepted_units if groups else None,
        "stop_reason": reason,
        "tau": settings.tau,
        "max_modules": settings.max_modules,
        "unit": settings.unit,
        "band_width": settings.band_width if groups else None,
        "perturbation": settings.perturbation,
        "alpha": settings.alpha if noise else None,
        "ift": asdict(rob.ift) if ift else None,
        "seeds": settings.seeds,
        "score": rob.score,
        "score_weights": rob.score_weights if rob.score == "combined" else None,
        "proxy_layers": view.layers,
        "ranking": ranked,
        "seed": rob.seed,
        "versions": versions(),
        "precision": detect().record(),
        "model_revision": model_revision(model),
    }
