"""The report's settings, torch- and matplotlib-free: the rule builds them when the workflow is
parsed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from securetune.domains import domain_spec
from securetune.jobs import arm_plans, evaluated_arms
from securetune.method import arm_kind, control_pairs, gamma_sweep_arms, replicates_of
from securetune.settings import StageSettings


def aligned_harmful_benchmarks(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The harmful benchmarks the alignment set took rows of (align.harmful names benchmarks),
    sorted; none when align is off. Their evaluation rows are disjoint from the trained ones but
    come from the same distribution, so they are no test of safety on new requests."""
    align = config["align"]
    if not align["enabled"]:
        return ()
    return tuple(sorted(source for source, n in align["harmful"].items() if n > 0))


@dataclass(frozen=True)
class ReportSettings(StageSettings):
    """Which arms the report shows (in order, with their kinds) and how its intervals are drawn."""

    # Every evaluated arm in report order: base, unaligned (when aligned here), the fine-tuned.
    arm_order: tuple[str, ...]
    # Each arm's kind (vanilla, ml_lr, ...; `reference` for base and unaligned), in report order.
    arm_kinds: dict[str, str]
    bootstrap_samples: int
    # Confidence level of every interval, e.g. 0.95.
    confidence: float
    # The robustness score the search ranked by (named in the report).
    score: str
    seed: int
    # The precision keys as configured (auto, or an explicit dtype / autocast), so the report
    # can say what they resolved to on the hardware the completions were generated on.
    precision: dict[str, str] = field(default_factory=dict)
    # The domain this report is of, its IFT source (which of the paper's settings it matches:
    # general or math) and its task metric; the source model decides whether Qi et al.'s
    # numbers for the same model are shown beside ours.
    domain: str = ""
    ift_source: str = ""
    task_metric: str = "usability"
    source_model: str = ""
    # A replicate's arm name (`<arm>_r<k>`, k >= 1) -> [its arm, k]: its rows are the arm's.
    replicate_of: dict[str, list] = field(default_factory=dict)
    # Each arm that trains by a module set -> its plan file (the report's module table).
    arm_plans: dict[str, str] = field(default_factory=dict)
    # [control arm, robust arm] pairs of one kind, gamma and lr: the selectors compared.
    selector_pairs: list[list[str]] = field(default_factory=list)
    # The harmful benchmarks the alignment set took rows of (`aligned_harmful_benchmarks`): the
    # headline attack success leaves them out and shows them apart.
    alignment_benchmarks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Rebuilt from JSON with sorted keys (`to_params`), so the order comes from arm_order:
        # it is the order of the frontier's legend and of the verdict rows.
        if set(self.arm_kinds) != set(self.arm_order):
            raise ValueError(
                f"report settings: arm_kinds {sorted(self.arm_kinds)} and arm_order "
                f"{sorted(self.arm_order)} name different arms"
            )
        object.__setattr__(self, "arm_order", tuple(self.arm_order))
        object.__setattr__(self, "arm_kinds", {arm: self.arm_kinds[arm] for arm in self.arm_order})
        object.__setattr__(self, "alignment_benchmarks", tuple(self.alignment_benchmarks))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], domain: str) -> Self:
        """One domain's report. The evaluated arms (`base`, `unaligned` when align is enabled,
        then finetune.arms): the same list, from the same function, as the rule's inputs, a
        replicated arm once (its replicates' rows are read as its own)."""
        replicates = replicates_of(config["finetune"])
        arms = tuple(a for a in evaluated_arms(config) if replicates.get(a, (a, 0))[1] == 0)
        spec = domain_spec(config, domain)
        return cls(
            arm_order=arms,
            arm_kinds={arm: arm_kind(config["finetune"], arm) for arm in arms},
            bootstrap_samples=config["report"]["bootstrap_samples"],
            confidence=config["report"]["confidence"],
            score=config["robustness"]["score"],
            seed=config["seed"],
            precision={
                "model.dtype": config["model"]["dtype"],
                "align.autocast": config["align"]["autocast"],
                "finetune.autocast": config["finetune"].get("autocast", "none"),
            },
            domain=domain,
            ift_source=spec["ift_source"],
            task_metric=spec["task_metric"],
            source_model=config["model"]["source"],
            replicate_of={name: [arm, k] for name, (arm, k) in replicates.items() if k},
            arm_plans=arm_plans(config),
            selector_pairs=[list(pair) for pair in control_pairs(config["finetune"])],
            alignment_benchmarks=aligned_harmful_benchmarks(config),
        )


@dataclass(frozen=True)
class GammaAblationSettings(StageSettings):
    """The gamma ablation's table of one domain: each sweep arm's gamma (finetune.gamma_sweep:
    ML-LR with the rest at lr * gamma) and how its intervals are drawn."""

    arm_gamma: dict[str, float]
    domain: str
    task_metric: str
    bootstrap_samples: int
    confidence: float
    seed: int
    alignment_benchmarks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A list after the JSON round trip of `to_params`.
        object.__setattr__(self, "alignment_benchmarks", tuple(self.alignment_benchmarks))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], domain: str) -> Self:
        sweep = gamma_sweep_arms(config["finetune"])
        return cls(
            arm_gamma={arm: float(spec["gamma"]) for arm, spec in sweep.items()},
            domain=domain,
            task_metric=domain_spec(config, domain)["task_metric"],
            bootstrap_samples=config["report"]["bootstrap_samples"],
            confidence=config["report"]["confidence"],
            seed=config["seed"],
            alignment_benchmarks=aligned_harmful_benchmarks(config),
        )
