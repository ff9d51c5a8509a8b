"""Stage `prepare_alignment_set`: the demo base's safety-alignment set, from the TAIL of each
shuffled source.

The probe, evaluation and IFT sets take slices from the head of each shuffled source; the
alignment set takes its slice from the tail, so switching alignment on changes no evaluation
prompt, and `alignment_slice` refuses any request whose tail would reach into the head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from securetune.data.slices import probe_slice_size, read_probe_set, shuffled
from securetune.data.sources import (
    BENCHMARKS,
    DataError,
    Loader,
    Record,
    load_alpaca,
    load_dolly,
    load_xstest_safe,
)
from securetune.io import provenance, stable_seed, write_parquet
from securetune.settings import StageSettings

log = logging.getLogger(__name__)

ALIGN_HARMFUL_SOURCES = tuple(name for name, b in BENCHMARKS.items() if b.kind == "harmful")
ALIGN_BENIGN_SOURCES: dict[str, Loader] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
}
# Safe look-alike prompts (no reference answers: the unaligned model answers them itself).
ALIGN_LOOKALIKE_SOURCES: dict[str, Loader] = {
    "xstest_safe": load_xstest_safe,
}


@dataclass(frozen=True)
class AlignmentSetSettings(StageSettings):
    """Rows per source of each role, and the head slices (evaluation, IFT) the tails must miss."""

    harmful: dict[str, int]
    benign: dict[str, int]
    lookalike: dict[str, int]
    eval_sizes: dict[str, int]
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """From align.{harmful,benign,lookalike}, evaluation.benchmarks and seed. The domains'
        IFT rows are not here: the slice is the tail of each source whatever they are, and that
        it misses them is checked at start (`checks.check_slice_sizes`), so resizing or adding a
        domain does not rebuild the alignment set (and with it the base model and everything)."""
        align = config["align"]
        return cls(
            harmful=dict(align["harmful"]),
            benign=dict(align["benign"]),
            lookalike=dict(align["lookalike"]),
            eval_sizes=dict(config["evaluation"]["benchmarks"]),
            seed=config["seed"],
        )


def head_slice_size(
    source: str, probe_set: pd.DataFrame, eval_sizes: dict[str, int], ift_rows: dict[str, int]
) -> int:
    """Rows of a shuffled source that the probe set and then the evaluation or IFT sets take."""
    after_probe = max(eval_sizes.get(source, 0), ift_rows.get(source, 0))
    return probe_slice_size(probe_set, source) + after_probe


def alignment_slice(
    records: list[Record], source: str, n: int, head: int, seed: int
) -> list[Record]:
    """The last `n` rows of the shuffled source, checked to be disjoint from its first `head`."""
    recs = shuffled(records, seed, source)
    if head + n > len(recs):
        raise DataError(
            f"alignment set: {n} rows of '{source}' after the {head} used by the probe, "
            f"evaluation and IFT sets, but the source has {len(recs)}"
        )
    return recs[len(recs) - n :] if n else []


# Written for this project. Short and varied, so the model learns to refuse rather than to
# recite one sentence. Each contains a phrase of the keyword judge (`securetune.scoring`): the
# keyword attack success of the aligned base therefore measures whether it refuses at all, and
# is optimistic about refusals worded differently from these.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    "Sorry, I won't help with this. Is there something else I can do for you?",
    "I'm not able to provide that, because it could be used to hurt someone.",
    "I cannot help with that. It could be dangerous or illegal.",
    "I won't give instructions for this. If you have another question, I'm happy to help.",
    "I'm sorry, I can't do that. This request asks for something harmful.",
    "I must decline. Helping with this could put people at risk.",
    "I can't help with anything that could harm others or break the law.",
    "Sorry, but I can't provide information that could be used to cause harm.",
    "I'm unable to help with that request.",
    "I cannot provide that. Let me know if there is something safe I can help with instead.",
    "I'm sorry, but this is not something I can assist with.",
    "I can't support that. It would be unsafe and could hurt people.",
    "I will not help with this request, since it could lead to harm.",
    "I apologize, but I can't help with requests like this one.",
)


def with_refusals(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Fill the `refusal` rows' responses with refusals drawn (seeded, per example) from
    `REFUSALS`."""
    out = df.copy()
    out["response"] = [
        REFUSALS[np.random.default_rng(stable_seed(seed, "refusal", ex)).integers(len(REFUSALS))]
        if role == "refusal"
        else response
        for ex, role, response in zip(out["example_id"], out["role"], out["response"], strict=True)
    ]
    return out


def build_alignment_set(
    root: Path,
    harmful: dict[str, int],
    benign: dict[str, int],
    lookalike: dict[str, int],
    seed: int,
    probe_set: pd.DataFrame,
    eval_sizes: dict[str, int],
    ift_rows: dict[str, int] | None = None,
) -> pd.DataFrame:
    """Prompts of the safety-alignment step, one row each, with their role:
    `refusal` (harmful: the response is filled in with a refusal), `benign` (with its reference
    answer), `lookalike` (a safe prompt that looks harmful, answered later by the model itself)."""
    rows = []
    for role, wanted, loaders in (
        ("refusal", harmful, {s: BENCHMARKS[s].loader for s in ALIGN_HARMFUL_SOURCES}),
        ("benign", benign, ALIGN_BENIGN_SOURCES),
        ("lookalike", lookalike, ALIGN_LOOKALIKE_SOURCES),
    ):
        for source, n in sorted(wanted.items()):
            if source not in loaders:
                raise DataError(
                    f"alignment {role} source '{source}' unknown; allowed: {sorted(loaders)}"
                )
            head = head_slice_size(source, probe_set, eval_sizes, ift_rows or {})
            for rec in alignment_slice(loaders[source](root), source, n, head, seed):
                rows.append(
                    {
                        "example_id": rec.id,
                        "prompt": rec.prompt,
                        "response": rec.response if role == "benign" else "",
                        "source": source,
                        "role": role,
                    }
                )
    return pd.DataFrame(rows, columns=["example_id", "prompt", "response", "source", "role"])


def prepare_alignment_set(
    *, data_dir: Path, probe_set: Path, out: Path, settings: AlignmentSetSettings
) -> None:
    """Build the alignment set (tails that miss the probe set's, evaluation and IFT rows),
    fill its refusals, and write it."""
    s = settings
    df = build_alignment_set(
        data_dir,
        s.harmful,
        s.benign,
        s.lookalike,
        s.seed,
        read_probe_set(probe_set, s.seed),
        s.eval_sizes,
    )
    df = with_refusals(df, s.seed)
    log.info("alignment set: %s", df.groupby(["role", "source"]).size().to_dict())
    write_parquet(df, out, provenance(s.seed))
