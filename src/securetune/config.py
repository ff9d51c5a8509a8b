"""Config validation with messages that name the key, and the config a run uses (config.yaml or
a full config given with --configfile). The typed settings of each stage are in `settings`."""

from __future__ import annotations

import copy
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


# Keys of an older layout, with where they went: named in the error instead of "unknown key".
MOVED_KEYS = {
    ("data", "ift_source"): "domains.<name>.ift_source",
    ("data", "ift_examples"): "domains.<name>.ift_examples",
    ("data", "ift_heldout_examples"): "domains.<name>.ift_heldout_examples",
}


def check_moved_keys(config: dict[str, Any]) -> None:
    """A config written for the one-domain layout gets told where each key went."""
    moved = [
        f"'{section}.{key}' is now '{target}'"
        for (section, key), target in MOVED_KEYS.items()
        if key in (config.get(section) or {})
    ]
    if moved:
        raise ConfigError(
            f"config keys moved: {'; '.join(moved)} (a `domains` section names each IFT "
            "domain: see config.yaml)"
        )


def validate_config(config: dict[str, Any], schema_path: str | Path) -> None:
    """Validate against the JSON schema (in YAML); raise one ConfigError listing every fault."""
    check_moved_keys(config)
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

    Snakemake merges overlays key by key, which is right for a partial overlay (a site's own keys
    on paper.yaml) but would let the default's arms and benchmarks leak into another scale.
    `overlays_merged` is Snakemake's own merge of the overlays and --config values.
    """
    if overlay_files and is_full_config(
        yaml.safe_load(Path(overlay_files[0]).read_text()) or {}, schema_path
    ):
        return copy.deepcopy(overlays_merged)
    return default
