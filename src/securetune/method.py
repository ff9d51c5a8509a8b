"""What the method decides, in one torch-free module: the kinds of arm, which need Mods_Robust,
what each kind's learning rates are, and the gamma ablation's arms.

The rules (which inputs a fine-tune waits for), the trainer's config (what an arm trains with)
and the parameter groups all import these, so a kind is defined once.
"""

from __future__ import annotations

import zlib
from typing import Any

from securetune.config import ConfigError

# vanilla: one lr for all; ml_lr: Mods_Robust at lr, the rest at lr * gamma; freeze: gamma = 0
# (the rest frozen); swat: only Mods_Robust train until switch_at, then all.
ARM_KINDS: tuple[str, ...] = ("vanilla", "ml_lr", "freeze", "swat")
# Kinds whose groups depend on Mods_Robust, so they wait for the search plan.
KINDS_WITH_PLAN: tuple[str, ...] = ("ml_lr", "freeze", "swat")
# Models evaluated without being fine-tuned: `base`, and `unaligned` when the base is aligned here.
REFERENCE_ARMS: tuple[str, ...] = ("base", "unaligned")
REFERENCE_KIND = "reference"
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
# Where parameters of no module (norms, embeddings, LM head) go.
OTHER_PARAMS: tuple[str, ...] = ("rest", "robust", "frozen")
TRAINING_METHODS: tuple[str, ...] = ("full", "lora")
# auto: bfloat16 where the hardware computes it natively, else none (`securetune.precision`).
AUTOCAST: tuple[str, ...] = ("auto", "none", "bfloat16")
DISTRIBUTED: tuple[str, ...] = ("ddp", "fsdp")
# finetune keys the launcher (torchrun), the scheduler and the rule's outputs read, not the
# training settings: how many processes and GPUs, what dtype the result is saved in (a separate
# flag, so it never changes the checkpoint fingerprint), whether the weights are kept, whether a
# checkpoint is replaced after or before its successor is written and whether a job stops before
# its time limit (flags of the trainer that change no result).
LAUNCH_KEYS: tuple[str, ...] = (
    "processes",
    "gpus",
    "save_dtype",
    "keep_weights",
    "checkpoint_keep_previous",
    "stop_before_time_limit",
)
# Which modules an arm of a plan kind trains at lr (the rest at lr * gamma): robust (the search's
# Mods_Robust), random (as many modules and about as many parameters, a seeded draw), inverse
# (the least robust of the same ranking) or attribution (the least safety-critical by the SNIP
# set difference of Wei et al. 2024). The controls that say whether the robust choice matters.
SELECTORS: tuple[str, ...] = ("robust", "random", "inverse", "attribution")
# A random set's name is this and its draw: random_d0, random_d1, ...
RANDOM_DRAW = "random_d"
# A replicate's arm name: `<arm>_r<k>` for k >= 1 (replicate 0 keeps the arm's own name).
REPLICATE_SUFFIX = "_r"


def needs_plan(kind: str) -> bool:
    """Does an arm of this kind train by Mods_Robust (and so wait for the search)?"""
    check_kind(kind)
    return kind in KINDS_WITH_PLAN


def check_kind(kind: str) -> None:
    if kind not in ARM_KINDS:
        raise ValueError(f"unknown arm kind '{kind}'; allowed: {list(ARM_KINDS)}")


def arm_gamma(kind: str, arm: dict[str, Any]) -> float:
    """The rest's learning-rate factor: freeze is gamma = 0 by construction (its rest is frozen,
    not slowed); the other kinds take the arm's gamma, 1 when it names none."""
    return 0.0 if kind == "freeze" else arm.get("gamma", 1.0)


def sweep_arm_name(gamma: float) -> str:
    """`ml_lr_g0p05` for gamma 0.05: a valid arm (and folder) name for every number."""
    text = f"{gamma:g}".replace(".", "p").replace("-", "m").replace("+", "")
    return f"ml_lr_g{text}"


def gamma_sweep_arms(finetune: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ablation's arms: one ml_lr arm per finetune.gamma_sweep value (not built by `all`)."""
    sweep = {
        sweep_arm_name(gamma): {"kind": "ml_lr", "gamma": gamma}
        for gamma in finetune.get("gamma_sweep", [])
    }
    clash = sorted(set(sweep) & set(finetune["arms"]))
    if clash:
        raise ConfigError(
            f"config key 'finetune.gamma_sweep': arm name(s) {clash} clash with finetune.arms"
        )
    return sweep


def replicate_name(arm: str, replicate: int) -> str:
    return arm if replicate == 0 else f"{arm}{REPLICATE_SUFFIX}{replicate}"


def replicates_of(finetune: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Every fine-tuned arm's name -> (the configured arm, replicate): an arm with `replicates: N`
    is trained N times (replicate 0 under its own name), each with its own data order and seeds."""
    names: dict[str, tuple[str, int]] = {}
    for arm, spec in finetune["arms"].items():
        for replicate in range(spec.get("replicates", 1)):
            name = replicate_name(arm, replicate)
            if name in names or (replicate and name in finetune["arms"]):
                raise ConfigError(
                    f"config key 'finetune.arms': replicate name '{name}' clashes with an arm"
                )
            names[name] = (arm, replicate)
    return names


def replicate_seed(seed: int, replicate: int) -> int:
    """Replicate 0 trains with the run's seed (the arms share one data order: paired); a later
    replicate draws its own, stably (crc32)."""
    if replicate == 0:
        return seed
    return zlib.crc32(f"{seed}:replicate:{replicate}".encode()) & 0x7FFFFFFF


def arm_spec(finetune: dict[str, Any], arm: str) -> dict[str, Any]:
    """An arm's own settings, from finetune.arms (a replicate's are its arm's) or the sweep."""
    sweep = gamma_sweep_arms(finetune)
    if arm in sweep:
        return sweep[arm]
    replicates = replicates_of(finetune)
    if arm not in replicates:
        raise ConfigError(f"arm '{arm}' is in neither finetune.arms nor finetune.gamma_sweep")
    return finetune["arms"][replicates[arm][0]]


def arm_selector(spec: dict[str, Any]) -> str:
    """The selector of an arm that trains by a module set (robust unless it names another)."""
    return spec.get("selector", "robust")


def selection_name(spec: dict[str, Any]) -> str:
    """The module set an arm trains by, as its plan file is named: robust, inverse, attribution,
    or random_d<draw> (random draws are numbered, so two arms naming one draw share it)."""
    selector = arm_selector(spec)
    if selector not in SELECTORS:
        raise ConfigError(f"unknown selector '{selector}'; allowed: {list(SELECTORS)}")
    return f"{RANDOM_DRAW}{spec.get('draw', 0)}" if selector == "random" else selector


def selection_parts(selection: str) -> tuple[str, int | None]:
    """(selector, draw) of a set's name: `selection_name` read back (draw None but for random)."""
    if selection.startswith(RANDOM_DRAW):
        return "random", int(selection.removeprefix(RANDOM_DRAW))
    return selection, None


def control_pairs(finetune: dict[str, Any]) -> list[tuple[str, str]]:
    """(control arm, robust arm) for each arm of another selector than robust and the robust arm
    of the same kind, gamma, lr and switch step: the same budget's comparison of module choices
    (a control without such an arm has none)."""

    def training(spec: dict[str, Any]) -> tuple:
        return (spec["kind"], arm_gamma(spec["kind"], spec), spec.get("lr"), spec.get("switch_at"))

    arms = finetune["arms"]
    robust = {
        training(spec): arm
        for arm, spec in reversed(arms.items())
        if needs_plan(spec["kind"]) and arm_selector(spec) == "robust"
    }
    return [
        (arm, robust[training(spec)])
        for arm, spec in arms.items()
        if needs_plan(spec["kind"]) and arm_selector(spec) != "robust" and training(spec) in robust
    ]


def arm_training_settings(finetune: dict[str, Any], arm: str, seed: int) -> dict[str, Any]:
    """The arm's whole training config (the fields of `TrainConfig`): the shared finetune keys,
    then the arm's own kind, lr override, gamma and switch step.

    Only this arm's values are in it, so changing one arm (or the sweep) reruns only that arm.
    """
    spec = arm_spec(finetune, arm)
    shared = {
        key: value
        for key, value in finetune.items()
        if key not in ("arms", "gamma_sweep", *LAUNCH_KEYS)
    }
    own = {
        "arm": arm,
        "kind": spec["kind"],
        "lr": spec.get("lr", shared["lr"]),
        "gamma": arm_gamma(spec["kind"], spec),
        "seed": replicate_seed(seed, replicates_of(finetune).get(arm, (arm, 0))[1]),
    }
    if "switch_at" in spec:
        own["switch_at"] = spec["switch_at"]
    return {**shared, **own}


def arm_kind(finetune: dict[str, Any], arm: str) -> str:
    """An evaluated arm's kind; the reference models are `reference`."""
    return REFERENCE_KIND if arm in REFERENCE_ARMS else arm_spec(finetune, arm)["kind"]
