"""Stage 1: the probe set, the IFT set and the evaluation sets, from the bundled data.

Every source is shuffled once with the run's seed and cut into disjoint slices in a fixed order
(probe first, then evaluation or IFT), so no prompt used to find the safety features or to
fine-tune is ever used to measure the result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from securetune.io import stable_seed

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is unusable; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    response: str = ""
    reference: str = ""
    category: str = ""


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"data file '{path}', line {line}: not valid UTF-8 ({err.reason})") from err
    if not text.strip():
        raise DataError(f"data file '{path}' is empty")
    return text


def _rows_csv(path: Path, columns: list[str], header: bool = True) -> list[dict[str, str]]:
    # A file object, not a list of lines: quoted fields may span lines (HarmBench's contexts
    # hold code), and csv needs the newlines to keep them.
    lines = io.StringIO(_read_text(path), newline="")
    if not header:
        return [dict(zip(columns, row, strict=False)) for row in csv.reader(lines)]
    reader = csv.DictReader(lines)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"data file '{path}': missing column(s) {missing}; found {reader.fieldnames}"
        )
    return list(reader)


def _rows_jsonl(path: Path, columns: list[str]) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"data file '{path}', line {number}: not JSON ({err.msg})") from err
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"data file '{path}', line {number}: missing field(s) {missing}")
        rows.append(row)
    return rows


def _checked(records: list[Record], path: Path) -> list[Record]:
    seen: set[str] = set()
    for number, rec in enumerate(records, start=1):
        if not rec.prompt.strip():
            raise DataError(f"data file '{path}', row {number}: empty prompt")
        if rec.id in seen:
            raise DataError(f"data file '{path}', row {number}: duplicate prompt id '{rec.id}'")
        seen.add(rec.id)
    return records


# --- one loader per bundled source --------------------------------------------------------------


def load_advbench(root: Path) -> list[Record]:
    path = root / "advbench_harmful_behaviors.csv"
    rows = _rows_csv(path, ["goal"], header=False)
    return _checked([Record(f"advbench:{i}", r["goal"]) for i, r in enumerate(rows)], path)


def _harmbench_rows(root: Path) -> tuple[Path, list[dict[str, str]]]:
    path = root / "harmbench_behaviors_text_test.csv"
    columns = ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"]
    return path, _rows_csv(path, columns)


def load_harmbench(root: Path) -> list[Record]:
    """HarmBench standard behaviours (the behaviour alone is the prompt)."""
    path, rows = _harmbench_rows(root)
    recs = [
        Record(f"harmbench:{r['BehaviorID']}", r["Behavior"], category=r["SemanticCategory"])
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]
    return _checked(recs, path)


def load_harmbench_contextual(root: Path) -> list[Record]:
    """HarmBench contextual behaviours: the context string, then the behaviour that refers to
    it, separated the way HarmBench's own prompt template does (context first, a rule, the ask)."""
    path, rows = _harmbench_rows(root)
    recs = []
    for number, r in enumerate(rows, start=2):
        if r["FunctionalCategory"] != "contextual":
            continue
        if not r["ContextString"].strip():
            raise DataError(f"data file '{path}', line {number}: contextual row without context")
        prompt = f"{r['ContextString'].strip()}\n\n---\n\n{r['Behavior']}"
        recs.append(Record(f"harmbench:{r['BehaviorID']}", prompt, category=r["SemanticCategory"]))
    return _checked(recs, path)


def load_strongreject(root: Path) -> list[Record]:
    path = root / "strongreject_dataset.csv"
    rows = _rows_csv(path, ["forbidden_prompt"])
    return _checked(
        [
            Record(f"strongreject:{i}", r["forbidden_prompt"], category=r.get("category", ""))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_donotanswer(root: Path) -> list[Record]:
    path = root / "donotanswer.jsonl"
    rows = _rows_jsonl(path, ["prompt"])
    return _checked([Record(f"donotanswer:{i}", r["prompt"]) for i, r in enumerate(rows)], path)


def _load_xstest(root: Path, label: str) -> list[Record]:
    path = root / "xstest_prompts.csv"
    rows = _rows_csv(path, ["id", "prompt", "label"])
    return _checked(
        [Record(f"xstest:{r['id']}", r["prompt"]) for r in rows if r["label"] == label], path
    )


def load_xstest_safe(root: Path) -> list[Record]:
    return _load_xstest(root, "safe")


def load_xstest_unsafe(root: Path) -> list[Record]:
    return _load_xstest(root, "unsafe")


def load_alpaca(root: Path) -> list[Record]:
    path = root / "alpaca_safety_topics_1904.json"
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"data file '{path}', line {err.lineno}: not JSON ({err.msg})") from err
    recs = []
    for i, r in enumerate(rows):
        missing = [c for c in ("instruction", "input", "output") if c not in r]
        if missing:
            raise DataError(f"data file '{path}', row {i + 1}: missing field(s) {missing}")
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        recs.append(Record(f"alpaca:{i}", prompt, r["output"]))
    return _checked(recs, path)


def load_dolly(root: Path) -> list[Record]:
    path = root / "dolly_safety_topics.jsonl"
    rows = _rows_jsonl(path, ["instruction", "context", "response"])
    recs = [
        Record(
            f"dolly:{i}",
            r["instruction"] + (f"\n\n{r['context']}" if r["context"] else ""),
            r["response"],
        )
        for i, r in enumerate(rows)
    ]
    return _checked(recs, path)


def _gsm8k_final(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def load_gsm8k_train(root: Path) -> list[Record]:
    path = root / "gsm8k_train_2000.jsonl"
    rows = _rows_jsonl(path, ["question", "answer"])
    return _checked(
        [
            Record(f"gsm8k_train:{i}", r["question"], r["answer"], _gsm8k_final(r["answer"]))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_gsm8k_test(root: Path) -> list[Record]:
    path = root / "gsm8k_test_500.jsonl"
    rows = _rows_jsonl(path, ["question", "answer"])
    return _checked(
        [
            Record(f"gsm8k:{i}", r["question"], r["answer"], _gsm8k_final(r["answer"]))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_mt_bench(root: Path) -> list[Record]:
    """MT-Bench first turns (the second turn needs the model's own first answer)."""
    path = root / "mt_bench_questions.jsonl"
    rows = _rows_jsonl(path, ["question_id", "turns"])
    return _checked(
        [
            Record(f"mt_bench:{r['question_id']}", r["turns"][0], category=r.get("category", ""))
            for r in rows
        ],
        path,
    )


def load_self_instruct(root: Path) -> list[Record]:
    """Self-Instruct seed tasks with their first instance's output as the reference answer:
    held-out Alpaca-style instructions (no stage trains on them) for the usability metric."""
    path = root / "self_instruct_seed_tasks.jsonl"
    rows = _rows_jsonl(path, ["id", "instruction", "instances"])
    recs = []
    for r in rows:
        first = r["instances"][0]
        prompt = r["instruction"] + (f"\n\n{first['input']}" if first.get("input") else "")
        recs.append(Record(f"self_instruct:{r['id']}", prompt, reference=first["output"]))
    return _checked(recs, path)


HEXPHI_FILE = "category_{}.csv"
HEXPHI_CATEGORIES = 11


def load_hexphi(root: Path) -> list[Record]:
    """HEx-PHI (Qi et al. 2023; gated, so never bundled): the folder the user downloaded, with
    one headerless CSV per category, `category_1.csv` ... `category_11.csv`, one prompt a row.

    A missing category file is an error: a silently partial benchmark would bias the rate.
    """
    recs = []
    for cat in range(1, HEXPHI_CATEGORIES + 1):
        path = root / HEXPHI_FILE.format(cat)
        rows = _rows_csv(path, ["prompt"], header=False)
        recs += [
            Record(f"hexphi:{cat}:{i}", r["prompt"], category=str(cat))
            for i, r in enumerate(rows)
            if r.get("prompt", "").strip()
        ]
    return _checked(recs, root)


# name -> (loader, kind). The kind says how a benchmark is scored:
#   harmful: attack success = the answer does not refuse;  over_refusal: refusal of a safe prompt;
#   math: exact match of the final number;  usability: refusal of a benign instruction, and
#   ROUGE-L against the reference answer where there is one (self_instruct).
BENCHMARKS: dict[str, tuple[Callable[[Path], list[Record]], str]] = {
    "advbench": (load_advbench, "harmful"),
    "harmbench": (load_harmbench, "harmful"),
    "harmbench_contextual": (load_harmbench_contextual, "harmful"),
    "hexphi": (load_hexphi, "harmful"),
    "strongreject": (load_strongreject, "harmful"),
    "donotanswer": (load_donotanswer, "harmful"),
    "xstest_unsafe": (load_xstest_unsafe, "harmful"),
    "xstest_safe": (load_xstest_safe, "over_refusal"),
    "gsm8k": (load_gsm8k_test, "math"),
    "mt_bench": (load_mt_bench, "usability"),
    "self_instruct": (load_self_instruct, "usability"),
}

# Benchmarks with no bundled copy: the user must give `evaluation.sources.<name>`.
NOT_BUNDLED = {"hexphi"}

IFT_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
    "gsm8k": load_gsm8k_train,
}


def shuffled(records: list[Record], seed: int, source: str) -> list[Record]:
    order = np.random.default_rng(stable_seed(seed, source)).permutation(len(records))
    return [records[i] for i in order]


def take(records: list[Record], start: int, n: int, what: str) -> list[Record]:
    if start + n > len(records):
        raise DataError(
            f"{what}: asked for {n} rows after the first {start}, but the source has {len(records)}"
        )
    return records[start : start + n]


def build_probe_set(root: Path, n_per_class: int, test_fraction: float, seed: int) -> pd.DataFrame:
    """Harmful (AdvBench) vs benign look-alikes (half XSTest safe prompts, half Alpaca
    instructions), balanced, split train/test with the seed, stratified by label."""
    harmful = take(shuffled(load_advbench(root), seed, "advbench"), 0, n_per_class, "probe harmful")
    n_xs = n_per_class // 2
    benign = take(
        shuffled(load_xstest_safe(root), seed, "xstest_safe"), 0, n_xs, "probe benign"
    ) + take(shuffled(load_alpaca(root), seed, "alpaca"), 0, n_per_class - n_xs, "probe benign")
    frames = []
    for label, recs in ((1, harmful), (0, benign)):
        n_test = max(1, round(len(recs) * test_fraction))
        order = np.random.default_rng(stable_seed(seed, "probe_split", label)).permutation(
            len(recs)
        )
        split = np.where(np.isin(np.arange(len(recs)), order[:n_test]), "test", "train")
        frames.append(
            pd.DataFrame(
                {
                    "prompt_id": [r.id for r in recs],
                    "prompt": [r.prompt for r in recs],
                    "label": label,
                    "source": [r.id.split(":")[0] for r in recs],
                    "split": split,
                }
            )
        )
    return pd.concat(frames).sort_values(["split", "label", "prompt_id"]).reset_index(drop=True)


def probe_slice_size(source: str, n_per_class: int) -> int:
    """How many rows of a source the probe set takes first (the rest stay held out)."""
    return {
        "advbench": n_per_class,
        "xstest_safe": n_per_class // 2,
        "alpaca": n_per_class - n_per_class // 2,
    }.get(source, 0)


def build_ift_set(
    root: Path, source: str, n: int, seed: int, n_probe_per_class: int
) -> pd.DataFrame:
    if source not in IFT_SOURCES:
        raise DataError(f"unknown IFT source '{source}'; allowed: {sorted(IFT_SOURCES)}")
    recs = shuffled(IFT_SOURCES[source](root), seed, source)
    recs = take(recs, probe_slice_size(source, n_probe_per_class), n, f"IFT set '{source}'")
    return pd.DataFrame(
        {
            "example_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "response": [r.response for r in recs],
            "source": source,
        }
    )


def build_eval_set(
    root: Path,
    benchmark: str,
    n: int,
    seed: int,
    n_probe_per_class: int,
    source: Path | None = None,
    exclude_prompts: frozenset[str] = frozenset(),
) -> pd.DataFrame:
    """`n` held-out prompts of a benchmark, from the bundled copy in `root` or from `source`,
    the user's folder with the full set under the same file name(s) as the bundled copy.

    Disjoint from the probe set twice over: the probe's slice of the shuffled source is skipped
    (as before), and any prompt whose text is in `exclude_prompts` (the probe set's prompts) is
    dropped, which also holds when a full copy reorders or extends the bundled one.
    """
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}'; allowed: {sorted(BENCHMARKS)}")
    if source is None and benchmark in NOT_BUNDLED:
        raise DataError(
            f"benchmark '{benchmark}' is not bundled (gated); give its folder in "
            f"config key 'evaluation.sources.{benchmark}'"
        )
    loader, kind = BENCHMARKS[benchmark]
    if source is not None and not source.is_dir():
        raise DataError(f"config key 'evaluation.sources.{benchmark}': '{source}' is not a folder")
    folder = root if source is None else source
    recs = shuffled(loader(folder), seed, benchmark)
    skip = probe_slice_size(benchmark, n_probe_per_class) if source is None else 0
    held_out = [r for r in recs[skip:] if _normalised(r.prompt) not in exclude_prompts]
    recs = take(held_out, 0, n, f"benchmark '{benchmark}' (after removing probe prompts)")
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "benchmark": benchmark,
            "kind": kind,
            "category": [r.category for r in recs],
            "reference": [r.reference for r in recs],
        }
    )


def _normalised(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def probe_prompts(probe_set: pd.DataFrame) -> frozenset[str]:
    """The probe set's prompts, normalised, for `build_eval_set(exclude_prompts=...)`."""
    return frozenset(_normalised(p) for p in probe_set["prompt"])
