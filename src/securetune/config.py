"""Config validation with messages that name the key, and typed views of each stage's settings."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class NoiseConfig:
    """Gaussian weight noise W + alpha * std(W) * N(0, I), one row per (alpha, seed)."""

    alphas: list[float]
    seeds: int


@dataclass(frozen=True)
class SearchConfig:
    tau: float
    max_modules: int
    alpha: float
    seeds: int


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning arm, everything else shared between arms."""

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
