"""Stage 5: grow Mods_Robust greedily, most robust unit first, checking the probe each time.

Modules that are each robust alone may not be robust together, so every candidate set is
perturbed jointly; the search stops when the probe's accuracy falls below tau or the set would
exceed its size budget. A unit is one module, or a group: one module type in a band of
consecutive layers, since the paper finds robustness varies regularly with type and depth (a
group also needs far fewer joint evaluations than its modules one by one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from securetune.ranking import rank_modules, scored_by
from securetune.robustness import (
    ProbeView,
    half_masks,
    ift_examples,
    linear_weight,
    open_probe_view,
    perturbed,
    reached_positions,
)
from securetune.settings import SearchSettings

log = logging.getLogger(__name__)


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
    # A unit above every proxy layer has no score (proxy_reach reachable): nothing vouches for
    # it, so it comes last, not at a place NaN's comparisons leave it.
    return sorted(order, key=lambda g: (math.isnan(score[g]), score[g], order.index(g))), groups


def accuracy_floor(clean: float, tau: float, tau_drop: float) -> float:
    """The lowest probe accuracy a candidate set may keep: the absolute `tau`, or `tau_drop`
    below the clean accuracy if that is higher. For a balanced probe tau 0.5 is chance and never
    binds, while a drop relative to the clean accuracy binds whatever the probe scores."""
    return max(tau, clean - tau_drop)


def greedy_search(
    ranked: list[str],
    evaluate: Callable[[list[str]], float],
    tau: float,
    max_modules: int,
    members: dict[str, list[str]] | None = None,
    *,
    tau_drop: float = 1.0,
    on_reject: str = "stop",
    sizes: dict[str, int] | None = None,
    max_params: int | None = None,
) -> tuple[list[str], pd.DataFrame, str]:
    """Return (selected modules, trace, stop reason: tau, budget or exhausted).

    `ranked` are units, most robust first; `members` maps a group to its modules (None: every
    unit is one module). `evaluate` gets the candidate set's module names and returns the
    probe accuracy with all of them perturbed jointly. A set is kept while its accuracy is at
    least `accuracy_floor` of the clean one (the empty set's); one below it stops the search
    (`on_reject` stop) or is skipped and the next unit tried (skip). The budget is at most
    `max_modules` modules and, with `sizes` (parameters per module), `max_params` parameters;
    a unit that would exceed it always stops the search, since filling the budget with less
    robust but smaller units would trade the ranking for size. The trace has one row per
    evaluated set (the first is the unperturbed model): size in modules and parameters, units,
    the unit added, probe accuracy, whether it was kept, and the floor it was held to.
    """
    if max_params is not None and sizes is None:
        raise ValueError("greedy_search: a parameter budget needs the modules' sizes")

    def modules_of(unit: str) -> list[str]:
        return [unit] if members is None else list(members[unit])

    def params_of(modules: list[str]) -> int:
        return sum(sizes[m] for m in modules) if sizes is not None else 0

    clean = evaluate([])
    floor = accuracy_floor(clean, tau, tau_drop)
    selected: list[str] = []
    units: list[str] = []
    rows = [_trace_row(0, [], 0, "", [], clean, True, params_of)]
    reason = "exhausted"
    for step, candidate in enumerate(ranked, start=1):
        new = modules_of(candidate)
        if _over_budget([*selected, *new], max_modules, max_params, params_of):
            reason = "budget"
            break
        accuracy = evaluate([*selected, *new])
        accepted = accuracy >= floor
        rows.append(
            _trace_row(step, selected, len(units), candidate, new, accuracy, accepted, params_of)
        )
        if accepted:
            selected += new
            units.append(candidate)
        elif on_reject == "stop":
            reason = "tau"
            break
    trace = pd.DataFrame(rows)
    trace["accuracy_floor"] = floor
    return selected, trace, reason


def _over_budget(
    modules: list[str],
    max_modules: int,
    max_params: int | None,
    params_of: Callable[[list[str]], int],
) -> bool:
    return len(modules) > max_modules or (
        max_params is not None and params_of(modules) > max_params
    )


def _trace_row(
    step: int,
    selected: list[str],
    n_units: int,
    added: str,
    new: list[str],
    accuracy: float,
    accepted: bool,
    params_of: Callable[[list[str]], int],
) -> dict:
    """One evaluated candidate set: the kept modules plus the unit `added` (its modules `new`)."""
    return {
        "step": step,
        "size": len(selected) + len(new),
        "params": params_of([*selected, *new]),
        "n_units": n_units + (1 if added else 0),
        "added": added,
        "added_modules": ",".join(new),
        "probe_accuracy": accuracy,
        "accepted": accepted,
    }


def module_budget(max_modules: int, max_module_share: float, n_scored: int) -> int:
    """The size budget in modules: `max_modules`, or the share of the scored modules if smaller
    (rounded down, so the share is never exceeded)."""
    return min(max_modules, math.floor(max_module_share * n_scored))


def param_budget(max_param_share: float, sizes: dict[str, int]) -> int | None:
    """The budget in parameters, a share of the scored modules' parameters (None at share 1:
    every scored module fits, so it never binds)."""
    if max_param_share >= 1:
        return None
    return math.floor(max_param_share * sum(sizes.values()))


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
    table = pd.read_parquet(robustness)
    if settings.probe_split == "halves":
        table, view = ranked_on_first_half(table, view)
    if settings.robustness.cached_prefix:
        view.cache_layers(list(range(view.model.config.num_hidden_layers)))
    examples = None
    if settings.perturbation == "ift":
        if ift_set is None:
            raise ValueError("search.perturbation ift: the job needs the IFT set")
        examples = ift_examples(model, ift_set, settings.robustness.ift)
    if settings.unit == "group":
        ranked, members = rank_groups(table, settings.band_width)
    else:
        ranked, members = rank_modules(table), None
    sizes = module_sizes(view, rank_modules(table))
    budget = SearchBudget(
        modules=module_budget(settings.max_modules, settings.max_module_share, len(sizes)),
        params=param_budget(settings.max_param_share, sizes),
    )
    selected, trace, reason = greedy_search(
        ranked,
        with_progress(joint_accuracy(view, settings, examples), len(ranked), budget, settings),
        settings.tau,
        budget.modules,
        members,
        tau_drop=settings.tau_drop,
        on_reject=settings.on_reject,
        sizes=sizes,
        max_params=budget.params,
    )
    log.info("Mods_Robust (%d, stopped by %s): %s", len(selected), reason, selected)
    seed = settings.robustness.seed
    trace["seed"] = seed
    trace["unit"] = settings.unit
    trace["perturbation"] = settings.perturbation
    trace["tau"] = settings.tau
    trace["tau_drop"] = settings.tau_drop
    trace["on_reject"] = settings.on_reject
    write_parquet(trace, out_trace, provenance(seed, model))
    plan = search_plan(selected, trace, reason, ranked, view, settings, model)
    write_json({**plan, **budget_record(selected, trace, budget, sizes, view)}, out_plan)


def ranked_on_first_half(table: pd.DataFrame, view: ProbeView) -> tuple[pd.DataFrame, ProbeView]:
    """`search.probe_split: halves`: the ranking by each module's score on the first half of
    the probe's test prompts, and the view of the second half that checks the candidate sets,
    so the sets are not checked on the prompts that made them look robust."""
    ranked = scored_by(table, RANKED_BY["halves"], "search.probe_split: halves")
    return ranked, view.subset(half_masks(view.labels)[1])


# The robustness table's column the search (and the inverse selector, from the plan) ranks by.
RANKED_BY = {"same": "score", "halves": "score_half0"}


@dataclass(frozen=True)
class SearchBudget:
    """The search's size limits once the shares are resolved: modules, and parameters (None:
    no parameter limit)."""

    modules: int
    params: int | None


def module_sizes(view: ProbeView, modules: list[str]) -> dict[str, int]:
    """Parameters of each scored module's weight, read from the loaded model (exact for any
    architecture, grouped-query attention's smaller k and v included)."""
    return {name: linear_weight(view.model, *parse_module_name(name)).numel() for name in modules}


def budget_record(
    selected: list[str],
    trace: pd.DataFrame,
    budget: SearchBudget,
    sizes: dict[str, int],
    view: ProbeView,
) -> dict:
    """The plan's budget and size fields: the budgets applied, the clean accuracy and the floor
    the sets were held to, the units skipped, and Mods_Robust's parameters as shares of the
    scored modules' and of the whole model's."""
    n_params = sum(sizes[m] for m in selected)
    return {
        "module_budget": budget.modules,
        "param_budget": budget.params,
        "clean_accuracy": float(trace["probe_accuracy"].iloc[0]),
        "accuracy_floor": float(trace["accuracy_floor"].iloc[0]),
        "skipped": trace.loc[~trace["accepted"] & (trace["step"] > 0), "added"].tolist(),
        "n_params": n_params,
        "param_share": n_params / sum(sizes.values()),
        "model_param_share": n_params / sum(p.numel() for p in view.model.parameters()),
    }


def with_progress(
    evaluate: Callable[[list[str]], float],
    n_units: int,
    budget: SearchBudget,
    settings: SearchSettings,
) -> Callable[[list[str]], float]:
    """`evaluate`, logging progress: the total counts every set the search could try (it may stop
    earlier at the floor or the parameter budget), so the ETA is an upper bound. Skipping a
    rejected unit may try every unit, the budget in modules bounds only the kept ones."""
    most = n_units if settings.on_reject == "skip" else min(n_units, budget.modules)
    progress = Progress("search (at most)", most + 1, log, unit="candidate sets")

    def logged(names: list[str]) -> float:
        accuracy = evaluate(names)
        progress.update()
        return accuracy

    return logged


def joint_accuracy(
    view: ProbeView, settings: SearchSettings, examples: list[Example] | None
) -> Callable[[list[str]], float]:
    """The probe accuracy with a candidate set's modules perturbed together, averaged over
    `settings.seeds` draws (the clean accuracy for the empty set). With proxy_reach
    `reachable` it is the clean accuracy less the mean drop over the proxy layers the set can
    reach (from its lowest module up), as the modules were scored."""

    def evaluate(names: list[str]) -> float:
        if not names:
            return view.accuracy(view.clean)
        modules = [parse_module_name(n) for n in names]
        lowest = min(layer for layer, _ in modules)
        positions = reached_positions(view.layers, lowest, settings.robustness.proxy_reach)
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
                accuracies.append(view.accuracy_after_drop(view.features(lowest), positions))
        return float(sum(accuracies) / len(accuracies))

    return evaluate


def search_plan(
    selected: list[str],
    trace: pd.DataFrame,
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
    accepted_units = trace.loc[trace["accepted"] & (trace["step"] > 0), "added"].tolist()
    return {
        "modules": selected,
        "groups": accepted_units if groups else None,
        "stop_reason": reason,
        "tau": settings.tau,
        "tau_drop": settings.tau_drop,
        "on_reject": settings.on_reject,
        "max_modules": settings.max_modules,
        "max_module_share": settings.max_module_share,
        "max_param_share": settings.max_param_share,
        "unit": settings.unit,
        "band_width": settings.band_width if groups else None,
        "perturbation": settings.perturbation,
        "alpha": settings.alpha if noise else None,
        "ift": asdict(rob.ift) if ift else None,
        "seeds": settings.seeds,
        "score": rob.score,
        "score_weights": rob.score_weights if rob.score == "combined" else None,
        "proxy_layers": view.layers,
        "proxy_reach": rob.proxy_reach,
        "probe_split": settings.probe_split,
        "ranked_by": RANKED_BY[settings.probe_split],
        "search_prompts": len(view.labels),
        "ranking": ranked,
        "seed": rob.seed,
        "versions": versions(),
        "precision": detect().record(),
        "model_revision": model_revision(model),
    }
