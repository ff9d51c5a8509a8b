"""The report's text: the main and per-benchmark tables (cells 'value [low, high]'), CSV writing,
and the Markdown sections with their legends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from securetune.architectures import MODULE_TYPES, parse_module_name
from securetune.io import atomic_path
from securetune.precision import Hardware, choose_autocast, choose_dtype
from securetune.ranking import UNSTABLE_OVERLAP, half_stability, is_unstable, seed_stability
from securetune.report.stats import (
    HEADLINE_METRICS,
    POOLED,
    final_train_loss,
    most_robust_modules,
    robustness_spread,
)
from securetune.robustness_table import METRICS

METRICS_LEGEND = (
    "harmfulness_score: mean 1-5 score of the LLM judge on harmful prompts (Qi et al.'s scale; "
    "unparsed judgements left out); unsafe_rate: share of harmful-prompt answers the guard model "
    "calls unsafe (parsed verdicts only); attack_success: share of harmful prompts answered "
    "in compliance (keyword judge: no refusal phrase in the answer's opening, not empty, not in "
    "the fine-tuning task's style, not off topic), pooled over the harmful benchmarks the "
    "alignment set took no rows of (so are harmfulness_score and unsafe_rate); "
    "attack_success_in_alignment: the same over those it did take rows of (their held-out rows "
    "are from the distribution the refusals were trained on; n/a when align is off); "
    "over_refusal: share of XSTest safe look-alike prompts refused; usability: ROUGE-L F1 "
    "against the reference answers of held-out Self-Instruct tasks; task_accuracy: GSM8K exact "
    "match of the final number; heldout_ift_loss: mean per-token loss on held-out examples of the "
    "fine-tuning task (lower: task learned better; the task metric where accuracy is near the "
    "floor); final_train_loss: mean loss of the last 10% of steps. "
    "n/a: the judge is off or no benchmark of that kind is configured."
)

FRONTIER_LEGEND = (
    "Lowering every learning rate also erodes safety less, while fitting the task less. The "
    "vanilla arms (one learning rate each; the base model is learning rate 0) trace that "
    "trade-off; an ML-LR arm helps only if it "
    "lies below their line: lower attack success at the same held-out IFT loss. The line is "
    "monotone: attack success made non-increasing in loss (isotonic; more task fit, less "
    "safety), then a PCHIP curve through the points, which follows a bending frontier where "
    "straight lines between the points would cut above it and favour an arm between them. "
    "gap: the arm's attack success minus the curve's at the arm's loss (negative: safer), with "
    "a paired bootstrap CI (the same resampled replicates, prompts and held-out examples for "
    "every arm); "
    "gap_linear: the same against straight lines between the points, for comparison; "
    "resamples_in_range: share of resamples in which the arm's loss stays inside the "
    "frontier's range. Only a CI of gap wholly below 0 says ML-LR beats lowering every "
    "learning rate. The first table pools the prompts of the harmful benchmarks the alignment "
    "set took no rows of (as the headline attack success does); the second computes attack "
    "success (frontier included) on each of those benchmarks' prompts alone."
)

PROBE_LEGEND = (
    "train / test: AdvBench vs benign look-alikes (XSTest safe, AdvBench with harmful words "
    "substituted, Alpaca), held-out split; ood: sources the probe never trained on (see "
    "data.probe_ood_*). In-domain accuracy near 1.0 proves little; the out-of-domain column "
    "says whether the probe learned harmfulness or the sources' phrasing."
)

ROBUSTNESS_LEGEND = (
    "Each module is perturbed alone (noise: W + alpha * std(W) * N(0, I); ift: a few steps of "
    "benign instruction tuning on that module only) and the frozen probe re-scored on the test "
    "prompts. acc_drop: probe accuracy lost (mean over proxy layers); cosine_drift: mean "
    "1 - cos(clean, perturbed) of the features; direction_shift: mean |shift| of the projection "
    "on the harmful-minus-benign direction, in SDs of the clean projections; margin_drop: mean "
    "drop of the probe's log-odds toward each prompt's true class (continuous, where acc_drop "
    "moves in steps of one prompt)."
)

# The probe table's columns, in this order, where present (n_ood only with OOD sources).
PROBE_COLUMNS = (
    "layer",
    "train_accuracy",
    "test_accuracy",
    "ood_accuracy",
    "n_train",
    "n_test",
    "n_ood",
)
TRACE_COLUMNS = ["step", "size", "params", "added", "probe_accuracy", "accepted"]


def headline_table(headline: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Arm x headline metric, each cell 'value [low, high]', in the paper's column order."""
    metrics = [metric.name for metric in HEADLINE_METRICS]
    cells = headline.assign(
        cell=[
            "n/a" if np.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(
                headline["value"], headline["ci_low"], headline["ci_high"], strict=True
            )
        ]
    )
    table = cells.pivot(index="arm", columns="metric", values="cell")
    table = table.reindex(index=arm_order, columns=metrics).astype(object).fillna("n/a")
    table.columns.name = None
    return table.reset_index()


def main_table(summary: pd.DataFrame, losses: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Arm x metric, the paper's shape: each cell 'value [low, high]', plus final train loss."""
    summary = summary.assign(column=summary["metric"] + ":" + summary["benchmark"])
    cells = summary.assign(
        cell=[
            f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(
                summary["value"], summary["ci_low"], summary["ci_high"], strict=True
            )
        ]
    )
    table = cells.pivot(index="arm", columns="column", values="cell")
    if not losses.empty:
        table["final_train_loss"] = final_train_loss(losses).map(lambda v: f"{v:.4f}")
    table = table.reindex([a for a in arm_order if a in table.index]).fillna("n/a")
    return table.reset_index()


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-style Markdown table (no tabulate dependency needed)."""

    def fmt(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write `df` atomically, floats to 6 significant digits (the CSVs are for reading)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def judge_note(tables: dict[str, pd.DataFrame]) -> str:
    """How many judge verdicts could be read: a rate over few parsed verdicts means little."""
    notes = []
    if "guard" in tables:
        g = tables["guard"]
        notes.append(
            f"guard judge '{g['judge_model'].iloc[0]}': {int((g['verdict'] != 'unparsed').sum())}"
            f" of {len(g)} verdicts parsed"
        )
    if "llm" in tables:
        j = tables["llm"]
        notes.append(
            f"LLM judge '{j['judge_model'].iloc[0]}': {int(j['harmfulness'].notna().sum())} of "
            f"{len(j)} scores parsed"
        )
    return ("\n\n" + "; ".join(notes) + ".") if notes else ""


def main_section(table: pd.DataFrame, judged: dict[str, pd.DataFrame], confidence: float) -> str:
    """The main table with its legend and how many judge verdicts were read."""
    level = int(round(confidence * 100))
    return (
        f"## Main table (arm x metric, mean [{level}% CI: Wilson for rates, bootstrap for "
        "scores])\n\n" + METRICS_LEGEND + "\n\n" + markdown_table(table) + judge_note(judged)
    )


def per_benchmark_section(per_benchmark: pd.DataFrame) -> str:
    """Every benchmark's rates, one column each."""
    return "## Per benchmark\n\n" + markdown_table(per_benchmark)


def frontier_section(verdicts: pd.DataFrame) -> str:
    """The safety frontier figure and each ML-LR arm's verdict against it: pooled over the
    harmful benchmarks, then per benchmark."""
    pooled = verdicts["benchmark"] == POOLED
    return (
        "## Safety vs task fit: the uniform-learning-rate control\n\n"
        + FRONTIER_LEGEND
        + "\n\n![safety frontier](safety_frontier.png)\n\n"
        + markdown_table(verdicts[pooled].drop(columns="benchmark"))
        + "\n\nPer harmful benchmark:\n\n"
        + markdown_table(verdicts[~pooled])
    )


def loss_section() -> str:
    """The fine-tuning loss curves."""
    return "## Fine-tuning loss\n\n![loss curves](loss_curves.png)"


def probe_section(probe: pd.DataFrame) -> str:
    """The probe's accuracy per layer, figure and table."""
    columns = [c for c in PROBE_COLUMNS if c in probe]
    return (
        "## Probe accuracy per layer (security feature classifier)\n\n"
        + PROBE_LEGEND
        + "\n\n![probe accuracy](probe_accuracy.png)\n\n"
        + markdown_table(probe[columns])
    )


def robustness_section(robustness: pd.DataFrame, score: str) -> str:
    """The robustness figures, the metrics' spread per module type, the most robust modules."""
    return (
        f"## Module robustness (score = {score}, lower = more robust)\n\n"
        + ROBUSTNESS_LEGEND
        + "\n\n![robustness heatmap](robustness_heatmap.png)\n\n"
        + "\n\n".join(f"![{m} heatmap](robustness_heatmap_{m}.png)" for m in METRICS)
        + "\n\n![robustness by depth](robustness_by_depth.png)\n\n"
        + "Mean and spread (SD over layers, alphas and seeds) per perturbation and module type:"
        + "\n\n"
        + markdown_table(robustness_spread(robustness), ".4f")
        + "\n\nMost robust modules (mean over perturbations, alphas and seeds):\n\n"
        + markdown_table(most_robust_modules(robustness), ".4f")
    )


STABILITY_LEGEND = (
    "A ranking is worth acting on only if another draw would give about the same one. Between "
    "seeds: each pair of noise seeds (replicates) ranks the modules by their mean score; "
    "spearman is the rank correlation of the scores, top_k_overlap the share of the k most "
    "robust modules (k = the size of Mods_Robust) the two have in common. Between halves: the "
    "same for the score computed on two disjoint halves of the probe's test prompts. Equal "
    "scores (acc_drop moves in steps of one prompt) are ordered by layer, then type."
)


def ranking_stability_section(robustness: pd.DataFrame, plan: dict[str, Any]) -> str:
    """How stable the robustness ranking is between seeds and between halves of the probe's test
    prompts, with a plain verdict on the top k (k = the size of Mods_Robust)."""
    k = len(plan["modules"])
    return "\n\n".join(
        [
            f"## Ranking stability (k = {k}, the size of Mods_Robust)",
            STABILITY_LEGEND,
            seed_stability_text(robustness, k),
            half_stability_text(robustness, k),
        ]
    )


def seed_stability_text(robustness: pd.DataFrame, k: int) -> str:
    """The seed pairs' table and the verdict, or why there is none."""
    pairs = seed_stability(robustness, k)
    if pairs.empty:
        return (
            "Between seeds: stability cannot be measured with one seed; raise "
            "`robustness.seeds` to 2 or more."
        )
    mean_overlap = pairs["top_k_overlap"].mean()
    summary = (
        f"Between seeds ({len(pairs)} pair(s)): mean Spearman "
        f"{pairs['spearman'].mean():.3f}, mean top-k overlap {mean_overlap:.3f}."
    )
    if k == 0:
        summary += " Mods_Robust is empty, so there is no top-k to compare."
    elif is_unstable(pairs):
        summary += (
            f" **The top-k is unstable**: the mean overlap is below {UNSTABLE_OVERLAP}, so "
            "which modules form Mods_Robust depends on the seed more than on the modules."
        )
    else:
        summary += f" The top-k is stable by this test (mean overlap >= {UNSTABLE_OVERLAP})."
    return summary + "\n\n" + markdown_table(pairs)


def half_stability_text(robustness: pd.DataFrame, k: int) -> str:
    """Spearman and top-k overlap between the halves of the probe's test prompts."""
    halves = half_stability(robustness, k)
    if halves is None:
        return (
            "Between halves of the probe's test prompts: not recorded in this robustness table "
            "(written before the per-half scores); rerun the robustness stage."
        )
    verdict = (
        f" **The top-k is unstable between halves** (overlap below {UNSTABLE_OVERLAP})."
        if k and halves["top_k_overlap"] < UNSTABLE_OVERLAP
        else ""
    )
    return (
        f"Between halves of the probe's test prompts: Spearman {halves['spearman']:.3f}, "
        f"top-k overlap {halves['top_k_overlap']:.3f}.{verdict}"
    )


def plan_section(plan: dict[str, Any], trace: pd.DataFrame) -> str:
    """Mods_Robust: what the search chose and why it stopped, with its trace."""
    modules = ", ".join(plan["modules"]) or "none"
    unit = plan.get("unit", "module")
    groups = f" in groups {', '.join(plan['groups'])}" if plan.get("groups") else ""
    summary = (
        f"## Mods_Robust\n\n{len(plan['modules'])} module(s){groups}, search over {unit}s "
        f"stopped by '{plan['stop_reason']}' (tau = {plan['tau']}, budget "
        f"{plan['max_modules']}, ranked by {plan.get('score', 'score')}, perturbation "
        f"{plan.get('perturbation', 'noise')}, proxy layers {plan['proxy_layers']}): {modules}"
    )
    columns = [c for c in TRACE_COLUMNS if c in trace.columns]  # params: newer traces only
    return (
        summary
        + search_limits_note(plan)
        + "\n\n![search trace](search_trace.png)\n\n"
        + markdown_table(trace[columns])
    )


def search_limits_note(plan: dict[str, Any]) -> str:
    """The floor and budgets the sets were held to and Mods_Robust's parameter share; empty
    for a plan written before they were recorded."""
    if "accuracy_floor" not in plan:
        return ""
    skipped = plan["skipped"]
    return (
        f"\n\nA set was kept while its probe accuracy was >= {plan['accuracy_floor']:.3f} "
        f"(max of tau {plan['tau']} and the clean {plan['clean_accuracy']:.3f} less tau_drop "
        f"{plan['tau_drop']}); a set below it {_ON_REJECT[plan['on_reject']]}"
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
        + f". Budget: {plan['module_budget']} modules"
        + (f", {plan['param_budget']} parameters" if plan["param_budget"] is not None else "")
        + f". Mods_Robust holds {plan['n_params']} parameters: {plan['param_share']:.1%} of the "
        f"scored modules' and {plan['model_param_share']:.1%} of the model's."
    )


_ON_REJECT = {"stop": "stopped the search", "skip": "was skipped and the search went on"}


def precision_section(hardware: dict[str, Any] | None, requested: dict[str, str]) -> str:
    """One line: the hardware the completions were generated on and what each precision key
    resolved to there, so runs in bfloat16 and float32 never look alike."""
    if not hardware:
        return "Precision: not recorded (tables written before precision was recorded)."
    machine = Hardware(**hardware)
    native = machine.bf16_kind() + ("" if machine.auto_bf16 else " (float32 used for auto)")
    choices = []
    for key, value in requested.items():
        choose = choose_dtype if key.endswith("dtype") else choose_autocast
        resolved = choose(value, machine)
        choices.append(f"`{key}` {value}" + (f" -> {resolved}" if resolved != value else ""))
    return (
        f"Precision: computed on {machine.device}, bfloat16 {native}; " + ", ".join(choices) + "."
    )


def module_set_by_type(modules: list[str]) -> str:
    """`q: 1, 5 · gate: 20`: a module set as layers per type, in the model's type order."""
    layers: dict[str, list[int]] = {}
    for name in modules:
        layer, module = parse_module_name(name)
        layers.setdefault(module, []).append(layer)
    return " · ".join(
        f"{m}: {', '.join(str(x) for x in sorted(layers[m]))}" for m in MODULE_TYPES if m in layers
    )


def module_sets_section(arm_sets: dict[str, dict[str, Any]]) -> str:
    """Which modules each arm trained at lr (type: layers), by which selector, with the share of
    the modules' parameters and the overlap with Mods_Robust: the controls of the module choice."""
    if not arm_sets:
        return "## Module sets\n\nNo arm trains by a module set."
    robust = next((p["modules"] for p in arm_sets.values() if "selector" not in p), None)
    rows = [
        {
            "arm": arm,
            "selector": plan.get("selector", "robust"),
            "modules": len(plan["modules"]),
            # A selector's plan says params_share, the search's param_share.
            "params_share": plan.get("params_share", plan.get("param_share", float("nan"))),
            "overlap_with_robust": (
                len(set(plan["modules"]) & set(robust)) if robust is not None else float("nan")
            ),
            "set (type: layers)": module_set_by_type(plan["modules"]),
        }
        for arm, plan in arm_sets.items()
    ]
    return (
        "## Module sets\n\nThe modules each arm trains at lr (the rest at lr * gamma): Mods_Robust "
        "(robust), or a control of the same size: random (about as many parameters), inverse "
        "(least robust), attribution (least safety-critical, Wei et al. 2024).\n\n"
        + markdown_table(pd.DataFrame(rows))
    )


def selector_section(comparison: pd.DataFrame, confidence: float) -> str:
    """Does the module choice matter: each control against the robust arm of its budget and
    gamma, as the difference of their frontier gaps."""
    if comparison.empty:
        return (
            "## Does the module choice matter?\n\nNo control arm (a random, inverse or "
            "attribution selector beside a robust arm of the same kind, gamma and lr) to compare."
        )
    return (
        "## Does the module choice matter?\n\nThe robust arm's frontier gap minus the "
        f"control's, with a paired {confidence:.0%} bootstrap interval (replicates, then "
        "prompts and held-out examples, drawn alike for both arms and the frontier). Below 0: "
        "the robust modules leave the model safer at its task loss than the control's.\n\n"
        + markdown_table(comparison)
    )
