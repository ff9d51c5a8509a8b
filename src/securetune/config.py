"""Config validation with messages that name the key, and typed views of each stage's settings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = f"under '{key}'" if error.absolute_path else "at the top level"
        return f"unknown config key(s) {extra} {where}; allowed keys: {allowed}"
    if error.validator == "enum":
        return f"config key '{key}': {error.instance!r} is not one of {schema['enum']}"
    if error.validator == "type":
        return f"config key '{key}': {error.instance!r} is not of type {schema['type']!r}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bounds = {
            k: schema[k]
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            if k in schema
        }
        return f"config key '{key}': {error.instance!r} is out of range {bounds}"
    if error.validator == "not":
        why = f" ({schema['description']})" if "description" in schema else ""
        return f"config key '{key}': {error.instance!r} is not allowed{why}"
    if error.validator == "required":
        return f"config section '{key}': {error.message}"
    return f"config key '{key}': {error.message}"


def validate_config(config: dict[str, Any], schema_path: str | Path) -> None:
    """Validate against the JSON schema (in YAML); raise one ConfigError listing every fault."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n  - ".join(_describe(e) for e in errors)
        raise ConfigError(f"invalid config ({len(errors)} problem(s)):\n  - {lines}")


def is_full_config(overlay: dict[str, Any], schema_path: str | Path) -> bool:
    """Does a config file hold every top-level section the schema requires?"""
    schema = yaml.safe_load(Path(schema_path).read_text())
    return set(schema["required"]) <= set(overlay)


def config_in_force(
    default: dict[str, Any],
    overlay_files: list[Path],
    overlays_merged: dict[str, Any],
    schema_path: str | Path,
) -> dict[str, Any]:
    """The config a run uses: config.yaml extended by the --configfile overlays, unless the first
    overlay is a full config (configs/tiny.yaml, configs/paper.yaml), which replaces config.yaml.

    Snakemake merges overlays key by key, which is right for a partial overlay (paper_gsm8k.yaml
    on paper.yaml) but would let the default's arms and benchmarks leak into another scale.
    `overlays_merged` is Snakemake's own merge of the overlays and --config values.
    """
    if overlay_files and is_full_config(
        yaml.safe_load(Path(overlay_files[0]).read_text()) or {}, schema_path
    ):
        return copy.deepcopy(overlays_merged)
    return default


@dataclass(frozen=True)
class NoiseConfig:
    """Gaussian weight noise W + alpha * std(W) * N(0, I), one row per (alpha, seed)."""

    alphas: list[float]
    seeds: int


@dataclass(frozen=True)
class SearchConfig:
    """Greedy search for Mods_Robust; `unit` module or group (type x band of `band_width`)."""

    tau: float
    max_modules: int
    alpha: float
    seeds: int
    perturbation: str = "noise"
    unit: str = "module"
    band_width: int = 1


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the chosen module types of every layer; used when method is lora."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    module_types: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning arm, everything else shared between arms.

    The fields after `seed` have defaults so that an arm config written before they existed still
    means what it meant (full fine-tuning, one process, no checkpoints).
    """

    arm: str
    kind: str
    lr: float
    gamma: float
    steps: int
    batch_size: int
    warmup_ratio: float
    schedule: str
    max_seq_len: int
    weight_decay: float
    grad_clip: float
    seed: int
    # full: every parameter of the modules trains; lora: only adapters on them (peft).
    method: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Norms, embeddings, LM head: join the rest (lr * gamma), the robust group (lr), or frozen.
    other_params: str = "rest"
    # swat only: first step (>= 1) or fraction of steps (< 1) at which all modules train.
    switch_at: float | None = None
    # Examples per forward pass on one process (gradient accumulation); 0: the whole share.
    micro_batch_size: int = 0
    # none, or bfloat16: autocast of the forward pass (master weights stay float32).
    autocast: str = "none"
    # Save a resumable checkpoint every N optimizer steps; 0: never.
    checkpoint_every: int = 0
    # ddp or fsdp (FSDP2, parameters keep their names); used only under torchrun with >1 process.
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            lora = dict(self.lora)
            if "module_types" in lora:
                lora["module_types"] = tuple(lora["module_types"])
            object.__setattr__(self, "lora", LoraSettings(**lora))
        choices = {
            "kind": ("vanilla", "ml_lr", "freeze", "swat"),
            "schedule": ("constant", "linear", "cosine"),
            "method": ("full", "lora"),
            "other_params": ("rest", "robust", "frozen"),
            "autocast": ("none", "bfloat16"),
            "distributed": ("ddp", "fsdp"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"finetune key '{key}': {getattr(self, key)!r} is not one of {list(allowed)}"
                )
        if self.kind == "swat" and self.switch_at is None:
            raise ConfigError(f"arm '{self.arm}': kind swat needs 'switch_at'")
        if self.method == "lora" and self.distributed == "fsdp":
            raise ConfigError(
                "finetune keys 'method: lora' and 'distributed: fsdp' do not combine: LoRA keeps "
                "the base weights frozen (they fit one GPU), so use distributed: ddp"
            )


@dataclass(frozen=True)
class GenerationConfig:
    backend: str
    max_new_tokens: int
    batch_size: int
