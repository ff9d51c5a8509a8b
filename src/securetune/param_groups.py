"""Optimizer parameter groups for the fine-tuning arms (the ML-LR core, in a few pure functions).

Like nanoGPT's `configure_optimizers`: every trainable parameter lands in exactly one group and
the groups are logged. A parameter claimed by two groups, or by none, is a bug in the plan or the
name mapping, so it raises instead of silently training at the wrong rate.

Every parameter has one of three roles, decided by its name alone (so the groups survive DDP,
FSDP with original parameters, and PEFT's `base_model.model.` prefix):

- `robust`: a parameter of a module in Mods_Robust (its weight, its bias, or its LoRA adapters);
- `rest`: a parameter of any other module (q k v o gate up down of some layer);
- `other`: a parameter of no module: norms, embeddings, the LM head. Where these go is the
  config key `finetune.other_params`: `rest` (default; they move like the non-robust modules),
  `robust` (they move at the full lr) or `frozen` (never trained). Module biases (Qwen2's q/k/v)
  belong to their module, not to `other`.

The arms (everything else held equal):

- `vanilla`: one group `all` at lr;
- `ml_lr`: `robust` at lr, `rest` at lr * gamma;
- `freeze`: gamma = 0, done by freezing: the non-robust parameters get `requires_grad = False`
  and are not in the optimizer at all (so no gradient is computed or all-reduced for them, and
  weight decay cannot move them);
- `swat`: `robust` at lr and `rest` at lr * gamma (gamma defaults to 1), but the `rest` group is
  held still (no update, no optimizer state) before the switch step; see `swat_switch_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from securetune.architectures import module_name, module_of_parameter
from securetune.method import OTHER_PARAMS, check_kind


@dataclass(frozen=True)
class GroupSpec:
    """A named group: which parameter names it claims and at what learning rate."""

    name: str
    lr: float
    claims: Callable[[str], bool]


class ParamGroupError(ValueError):
    """A parameter is in two groups or in none, or the plan names a module the model lacks."""


def build_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], specs: list[GroupSpec]
) -> list[dict]:
    """Torch optimizer groups (with `name` and `param_names` kept for logging).

    Frozen parameters (`requires_grad` False) are left out; empty groups are dropped.
    """
    groups = {
        spec.name: {"name": spec.name, "lr": spec.lr, "params": [], "param_names": []}
        for spec in specs
    }
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        owners = [spec.name for spec in specs if spec.claims(name)]
        if len(owners) > 1:
            raise ParamGroupError(f"parameter '{name}' is matched by groups {owners}")
        if not owners:
            raise ParamGroupError(
                f"parameter '{name}' is matched by no group (groups: {[s.name for s in specs]})"
            )
        groups[owners[0]]["params"].append(param)
        groups[owners[0]]["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]


def role_of(model_type: str, name: str, robust: set[str]) -> str:
    """`robust`, `rest` or `other` (see the module docstring), from the parameter's name."""
    owner = module_of_parameter(model_type, name)
    if owner is None:
        return "other"
    return "robust" if module_name(*owner) in robust else "rest"


def ml_lr_specs(
    model_type: str, robust: set[str], lr: float, gamma: float, other_params: str = "rest"
) -> list[GroupSpec]:
    """Mods_Robust (weights, biases or LoRA adapters) at lr, everything else at lr * gamma.

    `other_params` says which group the norms, embeddings and LM head join (`frozen` ones are
    expected to have `requires_grad` False already, see `frozen_parameter_names`).
    """
    if other_params not in OTHER_PARAMS:
        raise ValueError(f"unknown other_params '{other_params}'; allowed: {list(OTHER_PARAMS)}")

    def group_of(name: str) -> str:
        role = role_of(model_type, name, robust)
        if role == "other":
            return "robust" if other_params == "robust" else "rest"
        return role

    return [
        GroupSpec("robust", lr, lambda name: group_of(name) == "robust"),
        GroupSpec("rest", lr * gamma, lambda name: group_of(name) == "rest"),
    ]


def vanilla_specs(lr: float) -> list[GroupSpec]:
    return [GroupSpec("all", lr, lambda name: True)]


def check_plan_modules(model_type: str, parameter_names: Iterable[str], robust: set[str]) -> None:
    """Every module the plan names must own at least one parameter of the model."""
    owned = {
        module_name(*owner)
        for name in parameter_names
        if (owner := module_of_parameter(model_type, name)) is not None
    }
    missing = sorted(robust - owned)
    if missing:
        raise ParamGroupError(f"plan names module(s) {missing} that the model does not have")


def frozen_parameter_names(
    model_type: str,
    names: Iterable[str],
    kind: str,
    robust: set[str],
    other_params: str = "rest",
) -> list[str]:
    """Names of the parameters this arm never trains (to get `requires_grad = False`).

    `freeze` freezes every non-robust parameter, `other` ones too unless they join `robust`;
    `other_params: frozen` freezes the norms, embeddings and head in every arm.
    """
    check_kind(kind)
    if other_params not in OTHER_PARAMS:
        raise ValueError(f"unknown other_params '{other_params}'; allowed: {list(OTHER_PARAMS)}")
    frozen = []
    for name in names:
        role = role_of(model_type, name, robust)
        if role == "other":
            if other_params == "frozen" or (kind == "freeze" and other_params == "rest"):
                frozen.append(name)
        elif role == "rest" and kind == "freeze":
            frozen.append(name)
    return frozen


def freeze_for_arm(
    model: torch.nn.Module,
    model_type: str,
    kind: str,
    robust: set[str],
    other_params: str = "rest",
) -> list[str]:
    """Set `requires_grad = False` on the parameters the arm never trains; return their names.

    Must run before the model is wrapped for DDP/FSDP, which fix the set of trainable parameters.
    """
    named = dict(model.named_parameters())
    frozen = frozen_parameter_names(model_type, named, kind, robust, other_params)
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


def groups_for_arm(
    model: torch.nn.Module,
    kind: str,
    lr: float,
    gamma: float,
    robust: set[str],
    other_params: str = "rest",
    model_type: str | None = None,
) -> list[dict]:
    """The optimizer groups of one arm (over the parameters that still require grad).

    `model_type` defaults to `model.config.model_type`; pass it for wrapped models.
    """
    check_kind(kind)
    named = list(model.named_parameters())
    if kind == "vanilla":
        return build_param_groups(named, vanilla_specs(lr))
    model_type = model_type or model.config.model_type
    check_plan_modules(model_type, (n for n, _ in named), robust)
    if kind == "freeze":
        # Non-robust parameters are frozen (see freeze_for_arm); a stray trainable one is a bug.
        gamma = 0.0
    specs = ml_lr_specs(model_type, robust, lr, gamma, other_params)
    groups = build_param_groups(named, specs)
    if kind == "freeze" and any(g["name"] == "rest" for g in groups):
        rest = next(g for g in groups if g["name"] == "rest")["param_names"]
        raise ParamGroupError(
            f"arm kind 'freeze': {len(rest)} non-robust parameter(s) still require grad "
            f"(e.g. '{rest[0]}'); call freeze_for_arm first"
        )
    return groups


def swat_switch_step(switch_at: float, steps: int) -> int:
    """First step at which SWAT trains every module.

    `switch_at` >= 1 is a step count; 0 < `switch_at` < 1 a fraction of the steps (rounded up,
    so a fraction never gives zero robust-only steps).
    """
    if switch_at >= 1:
        if switch_at != int(switch_at):
            raise ValueError(f"swat switch_at {switch_at}: a step count must be whole")
        return min(int(switch_at), steps)
    if switch_at <= 0:
        raise ValueError(f"swat switch_at {switch_at}: must be > 0")
    return min(steps, math.ceil(switch_at * steps))


def held_groups(kind: str, step: int, switch_step: int | None) -> set[str]:
    """Groups that must not move at this step: SWAT's `rest` before the switch, else none."""
    if kind == "swat" and switch_step is not None and step < switch_step:
        return {"rest"}
    return set()
