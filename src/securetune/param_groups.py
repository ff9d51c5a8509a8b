"""Optimizer parameter groups for the fine-tuning arms (the ML-LR core, in one pure function).

Like nanoGPT's `configure_optimizers`: every trainable parameter lands in exactly one group and
the groups are logged. A parameter claimed by two groups, or by none, is a bug in the plan or the
name mapping, so it raises instead of silently training at the wrong rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from securetune.architectures import module_name, module_of_parameter


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
    """Torch optimizer groups (with `name` and `param_names` kept for logging)."""
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


def ml_lr_specs(model_type: str, robust: set[str], lr: float, gamma: float) -> list[GroupSpec]:
    """Mods_Robust (their weights, biases or LoRA adapters) at lr, everything else at lr * gamma."""

    def is_robust(name: str) -> bool:
        owner = module_of_parameter(model_type, name)
        return owner is not None and module_name(*owner) in robust

    return [
        GroupSpec("robust", lr, is_robust),
        GroupSpec("rest", lr * gamma, lambda name: not is_robust(name)),
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


def groups_for_arm(
    model: torch.nn.Module, kind: str, lr: float, gamma: float, robust: set[str]
) -> list[dict]:
    """The optimizer groups of one arm: `vanilla` or `ml_lr`."""
    named = list(model.named_parameters())
    if kind == "vanilla":
        return build_param_groups(named, vanilla_specs(lr))
    if kind == "ml_lr":
        model_type = model.config.model_type
        check_plan_modules(model_type, (n for n, _ in named), robust)
        return build_param_groups(named, ml_lr_specs(model_type, robust, lr, gamma))
    raise ValueError(f"unknown arm kind '{kind}'; allowed: ['vanilla', 'ml_lr']")
