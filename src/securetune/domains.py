"""The IFT domains of a run (`domains:` in the config), torch-free.

Each domain is benign instruction tuning on one source (the paper's general domain on Alpaca,
its math domain on GSM8K): every arm is fine-tuned on it and evaluated, under
`results/<domain>/`. What comes before the IFT data (the model, its alignment, the probe, the
robustness table, the search) is computed once and shared by every domain, and so are the
evaluations of the models no domain trained (`base`, `unaligned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securetune.config import ConfigError

Config = Mapping[str, Any]

# The folders of `results/` that hold the shared stages: a domain of the same name would mix
# its files with theirs.
RESERVED_NAMES: frozenset[str] = frozenset(
    {
        "data", "model", "align", "features", "probe", "robustness", "search", "finetune",
        "generations", "scores", "judge", "ift_loss", "report",
    }
)  # fmt: skip


def domain_names(config: Config) -> list[str]:
    """The domains in config order (the order of the paper tables' sections)."""
    return list(config["domains"])


def domain_spec(config: Config, domain: str) -> Mapping[str, Any]:
    if domain not in config["domains"]:
        raise ConfigError(f"domain '{domain}' is not in config section 'domains'")
    return config["domains"][domain]


def domain_finetune(config: Config, domain: str) -> dict[str, Any]:
    """The finetune section as this domain trains with it: the shared keys, then the domain's
    own `finetune` overrides (its steps, sequence length, ...)."""
    return {**config["finetune"], **domain_spec(config, domain).get("finetune", {})}


def ift_rows_by_source(config: Config) -> dict[str, int]:
    """Rows of each IFT source that an IFT set takes after the probe's slice: the most any
    domain's training plus held-out rows take, or the robustness set's (its head). The
    alignment set, taken from the end of the same shuffled source, must miss all of them."""
    rows: dict[str, int] = {}
    for spec in config["domains"].values():
        wanted = spec["ift_examples"] + spec["ift_heldout_examples"]
        rows[spec["ift_source"]] = max(rows.get(spec["ift_source"], 0), wanted)
    ift = config["robustness"]["ift"]
    rows[ift["source"]] = max(rows.get(ift["source"], 0), ift["examples"])
    return rows


def check_domains(config: Config) -> None:
    """Domain names that could not be folders of `results/` next to the shared stages."""
    clash = sorted(set(config["domains"]) & RESERVED_NAMES)
    if clash:
        raise ConfigError(
            f"config section 'domains': name(s) {clash} are folders of results/ that every "
            f"domain shares; reserved: {sorted(RESERVED_NAMES)}"
        )
