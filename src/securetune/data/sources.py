"""The bundled data: one loader per source, and the registries that name them.

Each loader reads one file format, checks it (a message names the file, the row and the
problem) and returns `Record`s with stable ids; nothing here shuffles or slices.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is unusable; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class Record:
    """One prompt of a source, with its reference answer and category where it has them."""

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


# Control characters other than tab and line breaks: a NUL or an escape byte in a prompt is a
# broken file (or an injected one), not text a tokenizer should see.
_CONTROL = {chr(c) for c in range(32) if chr(c) not in "\t\n\r"} | {chr(127)}


def _control_character(text: str) -> str | None:
    """The first control character of `text` (as U+XXXX), or None."""
    found = next((ch for ch in text if ch in _CONTROL), None)
    return None if found is None else f"U+{ord(found):04X}"


def _checked(records: list[Record], path: Path) -> list[Record]:
    seen: set[str] = set()
    for number, rec in enumerate(records, start=1):
        if not rec.prompt.strip():
            raise DataError(f"data file '{path}', row {number}: empty prompt")
        # Prompts only: the bundled Alpaca holds a response with U+0003, harmless as a target.
        if bad := _control_character(rec.prompt):
            raise DataError(
                f"data file '{path}', row {number} (id '{rec.id}'): control character {bad} "
                "in the prompt"
            )
        if rec.id in seen:
            raise DataError(f"data file '{path}', row {number}: duplicate prompt id '{rec.id}'")
        seen.add(rec.id)
    return records


# --- one loader per bundled source --------------------------------------------------------------


def load_advbench(root: Path) -> list[Record]:
    """AdvBench harmful behaviours (headerless CSV, one goal a row)."""
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
    """StrongREJECT forbidden prompts, with their category."""
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
    """Do-Not-Answer prompts (JSON lines)."""
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
    """XSTest's safe prompts: harmful-sounding words, benign intent."""
    return _load_xstest(root, "safe")


def load_xstest_unsafe(root: Path) -> list[Record]:
    """XSTest's unsafe contrast prompts."""
    return _load_xstest(root, "unsafe")


def load_alpaca(root: Path) -> list[Record]:
    """Alpaca instructions (input appended) with their reference outputs."""
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
    """Dolly instructions (context appended) with their reference responses."""
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


def _gsm8k(path: Path, prefix: str) -> list[Record]:
    rows = _rows_jsonl(path, ["question", "answer"])
    return _checked(
        [
            Record(f"{prefix}:{i}", r["question"], r["answer"], _gsm8k_final(r["answer"]))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_gsm8k_train(root: Path) -> list[Record]:
    """GSM8K training problems; the reference is the final number of the answer."""
    return _gsm8k(root / "gsm8k_train_2000.jsonl", "gsm8k_train")


def load_gsm8k_test(root: Path) -> list[Record]:
    """GSM8K test problems; the reference is the final number of the answer."""
    return _gsm8k(root / "gsm8k_test_500.jsonl", "gsm8k")


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


# The authors withheld category 2 (child abuse content) from the released set.
HEXPHI_WITHHELD = {2}


def load_hexphi(root: Path) -> list[Record]:
    """HEx-PHI (Qi et al. 2023; gated, so never bundled): the folder the user downloaded, with
    one headerless CSV per category, `category_1.csv` ... `category_11.csv`, one prompt a row.

    A missing category file is an error (a silently partial benchmark would bias the rate),
    except category 2, which the public release does not include.
    """
    recs = []
    for cat in range(1, HEXPHI_CATEGORIES + 1):
        path = root / HEXPHI_FILE.format(cat)
        if cat in HEXPHI_WITHHELD and not path.exists():
            log.info("HEx-PHI: %s absent (withheld from the public release)", path.name)
            continue
        rows = _rows_csv(path, ["prompt"], header=False)
        recs += [
            Record(f"hexphi:{cat}:{i}", r["prompt"], category=str(cat))
            for i, r in enumerate(rows)
            if r.get("prompt", "").strip()
        ]
    return _checked(recs, root)


def load_harmbench_val(root: Path) -> list[Record]:
    """HarmBench's validation standard behaviours: harmful, out of domain, and never evaluated
    (the evaluation benchmark 'harmbench' is the test split), so the probe may use all 41."""
    path = root / "harmbench_behaviors_text_val.csv"
    rows = _rows_csv(path, ["Behavior", "FunctionalCategory", "BehaviorID"])
    recs = [
        Record(f"harmbench_val:{r['BehaviorID']}", r["Behavior"])
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]
    return _checked(recs, path)


Loader = Callable[[Path], list[Record]]


class Benchmark(NamedTuple):
    """A benchmark's loader and kind; the kind says how it is scored:

    harmful: attack success = the answer does not refuse;  over_refusal: refusal of a safe prompt;
    math: exact match of the final number;  usability: refusal of a benign instruction, and
    ROUGE-L against the reference answer where there is one (self_instruct).
    """

    loader: Loader
    kind: str


BENCHMARKS: dict[str, Benchmark] = {
    "advbench": Benchmark(load_advbench, "harmful"),
    "harmbench": Benchmark(load_harmbench, "harmful"),
    "harmbench_contextual": Benchmark(load_harmbench_contextual, "harmful"),
    "hexphi": Benchmark(load_hexphi, "harmful"),
    "strongreject": Benchmark(load_strongreject, "harmful"),
    "donotanswer": Benchmark(load_donotanswer, "harmful"),
    "xstest_unsafe": Benchmark(load_xstest_unsafe, "harmful"),
    "xstest_safe": Benchmark(load_xstest_safe, "over_refusal"),
    "gsm8k": Benchmark(load_gsm8k_test, "math"),
    "mt_bench": Benchmark(load_mt_bench, "usability"),
    "self_instruct": Benchmark(load_self_instruct, "usability"),
}

# Benchmarks with no bundled copy: the user must give `evaluation.sources.<name>`.
NOT_BUNDLED = {"hexphi"}

IFT_SOURCES: dict[str, Loader] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
    "gsm8k": load_gsm8k_train,
}

# Out-of-domain sources of the probe: harmful and benign sets the probe never trains on.
OOD_HARMFUL: dict[str, Loader] = {
    "harmbench_val": load_harmbench_val,
    "harmbench": load_harmbench,
    "strongreject": load_strongreject,
}
OOD_BENIGN: dict[str, Loader] = {
    "self_instruct": load_self_instruct,
    "dolly": load_dolly,
}
# The probe set's benign class, in the order its counts are dealt (`ProbeSpec.benign_counts`).
BENIGN_MIX_SOURCES = ("xstest_safe", "advbench_substituted", "alpaca")
