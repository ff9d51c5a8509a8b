"""Full benchmark sets from the Hugging Face hub: `evaluation.sources.<name>: hf:<dataset id>`.

The `fetch_benchmark` rule loads the set once with `datasets.load_dataset` and writes it under
the bundled file name, in the bundled format, so `securetune.data` reads it like a folder the
user filled by hand: one loader per benchmark, whatever the origin of its rows.

Each benchmark has one hub layout (the dataset id it was written for, its config, split and the
columns read). Another id with the same columns works too (a mirror, a private copy, a local
folder holding the same files); a missing column is an error naming the dataset and what it
has. `hf:<id>@<revision>` pins a commit, branch or tag. Gated sets need a token in `HF_TOKEN`
from an account that accepted their terms; config never holds it. (HEx-PHI has no layout here:
its release is one headerless CSV per category, given as a folder.)

Not imported by the Snakefile's parse beyond `is_hub_source`/`parse_hub_source` (no datasets).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
Rows = list[dict[str, Any]]


def is_hub_source(value: str) -> bool:
    return value.startswith(HUB_PREFIX)


def parse_hub_source(value: str) -> tuple[str, str | None]:
    """`hf:owner/name@revision` -> ("owner/name", "revision"); the revision is optional."""
    if not is_hub_source(value) or not value[len(HUB_PREFIX) :].strip():
        raise ValueError(f"'{value}' is not of the form hf:<dataset id>[@<revision>]")
    dataset, _, revision = value[len(HUB_PREFIX) :].partition("@")
    return dataset, revision or None


def _write_csv(path: Path, header: list[str] | None, rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


# --- one writer per bundled file format (see resources/data/README.md) ---------------------------


def _advbench(rows: Rows, out: Path) -> None:
    _write_csv(out / "advbench_harmful_behaviors.csv", None, [[r["prompt"]] for r in rows])


def _harmbench(functional_category: str) -> Callable[[Rows, Path], None]:
    """HarmBench's own CSV columns; the hub copy has no behaviour ids, so the row number is one."""

    def write(rows: Rows, out: Path) -> None:
        _write_csv(
            out / "harmbench_behaviors_text_test.csv",
            ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"],
            [
                [
                    r["prompt"],
                    functional_category,
                    r["category"],
                    r.get("context", ""),
                    f"hub_{functional_category}_{i}",
                ]
                for i, r in enumerate(rows)
            ],
        )

    return write


def _strongreject(rows: Rows, out: Path) -> None:
    _write_csv(
        out / "strongreject_dataset.csv",
        ["category", "source", "forbidden_prompt"],
        [[r["category"], r["source"], r["prompt"]] for r in rows],
    )


def _donotanswer(rows: Rows, out: Path) -> None:
    _write_jsonl(
        out / "donotanswer.jsonl",
        [{"prompt": r["question"], "risk_area": r["risk_area"]} for r in rows],
    )


def _xstest(rows: Rows, out: Path) -> None:
    """XSTest's ids are its row numbers from 1, as in the original CSV."""
    _write_csv(
        out / "xstest_prompts.csv",
        ["id", "prompt", "type", "label"],
        [[i, r["prompt"], r["type"], r["label"]] for i, r in enumerate(rows, start=1)],
    )


def _gsm8k(rows: Rows, out: Path) -> None:
    _write_jsonl(
        out / "gsm8k_test_500.jsonl",
        [{"question": r["question"], "answer": r["answer"]} for r in rows],
    )


def _mt_bench(rows: Rows, out: Path) -> None:
    _write_jsonl(
        out / "mt_bench_questions.jsonl",
        [
            {"question_id": r["prompt_id"], "category": r["category"], "turns": list(r["prompt"])}
            for r in rows
        ],
    )


@dataclass(frozen=True)
class HubLayout:
    """Where a benchmark's full set lies on the hub and how its rows become the bundled file."""

    dataset: str  # the id this layout was written for (the one to give in the common case)
    config: str | None
    split: str
    columns: tuple[str, ...]
    write: Callable[[Rows, Path], None]


_XSTEST = HubLayout("walledai/XSTest", None, "test", ("prompt", "type", "label"), _xstest)

HUB_LAYOUTS: dict[str, HubLayout] = {
    "advbench": HubLayout("walledai/AdvBench", None, "train", ("prompt",), _advbench),
    "harmbench": HubLayout(
        "walledai/HarmBench", "standard", "train", ("prompt", "category"), _harmbench("standard")
    ),
    "harmbench_contextual": HubLayout(
        "walledai/HarmBench",
        "contextual",
        "train",
        ("prompt", "context", "category"),
        _harmbench("contextual"),
    ),
    "strongreject": HubLayout(
        "walledai/StrongREJECT", None, "train", ("prompt", "category", "source"), _strongreject
    ),
    "donotanswer": HubLayout(
        "LibrAI/do-not-answer", None, "train", ("question", "risk_area"), _donotanswer
    ),
    # One file holds both halves; each benchmark's loader keeps its own label.
    "xstest_safe": _XSTEST,
    "xstest_unsafe": _XSTEST,
    "gsm8k": HubLayout("openai/gsm8k", "main", "test", ("question", "answer"), _gsm8k),
    "mt_bench": HubLayout(
        "HuggingFaceH4/mt_bench_prompts",
        None,
        "train",
        ("prompt", "prompt_id", "category"),
        _mt_bench,
    ),
}


def check_hub_source(benchmark: str, value: str) -> None:
    """Fail at the start, naming the config key, on a hub source that cannot be fetched."""
    key = f"evaluation.sources.{benchmark}"
    try:
        parse_hub_source(value)
    except ValueError as err:
        raise ValueError(f"config key '{key}': {err}") from None
    if benchmark not in HUB_LAYOUTS:
        raise ValueError(
            f"config key '{key}': no hub layout for '{benchmark}' (hub sources: "
            f"{sorted(HUB_LAYOUTS)}); give a folder holding its files instead"
        )


def load_hub_rows(benchmark: str, value: str) -> tuple[Rows, dict[str, Any]]:
    """The rows of a benchmark's hub set, and where they came from."""
    from datasets import load_dataset  # heavy; only the fetch job needs it

    layout = HUB_LAYOUTS[benchmark]
    dataset, revision = parse_hub_source(value)
    ds = load_dataset(dataset, layout.config, split=layout.split, revision=revision)
    missing = [c for c in layout.columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"hub dataset '{dataset}' (config {layout.config}, split {layout.split}) lacks "
            f"column(s) {missing} that benchmark '{benchmark}' reads; it has {ds.column_names} "
            f"(the layout read is that of {layout.dataset})"
        )
    origin = {
        "benchmark": benchmark,
        "dataset": dataset,
        "revision": revision,
        "config": layout.config,
        "split": layout.split,
        "rows": len(ds),
        "fingerprint": ds._fingerprint,
    }
    return ds.select_columns(list(layout.columns)).to_list(), origin


def fetch_benchmark(benchmark: str, value: str, out_dir: Path) -> None:
    """Write a benchmark's hub set into `out_dir` in the bundled format, with `origin.json`
    beside it; the folder appears whole or not at all."""
    from securetune.io import atomic_dir, write_json

    rows, origin = load_hub_rows(benchmark, value)
    if not rows:
        raise ValueError(f"hub dataset '{origin['dataset']}' has no rows for '{benchmark}'")
    with atomic_dir(out_dir) as tmp:
        HUB_LAYOUTS[benchmark].write(rows, tmp)
        write_json(origin, tmp / "origin.json")
    log.info("%s: %d rows from %s", benchmark, len(rows), json.dumps(origin, sort_keys=True))
