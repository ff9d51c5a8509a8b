"""Stage 1: the probe set, the IFT set and the evaluation sets, from the bundled data.

Every source is shuffled once with the run's seed and cut into disjoint slices in a fixed order
(probe first, then evaluation or IFT), so no prompt used to find the safety features or to
fine-tune is ever used to measure the result.
"""

from __future__ import annotations

import csv
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
    lines = _read_text(path).splitlines()
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


def load_harmbench(root: Path) -> list[Record]:
    """HarmBench standard behaviours (contextual ones need their context string; see issue 3)."""
    path = root / "harmbench_behaviors_text_test.csv"
    rows = _rows_csv(path, ["Behavior", "FunctionalCategory", "BehaviorID"])
    recs = [
        Record(f"harmbench:{r['BehaviorID']}", r["Behavior"])
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]
    return _checked(recs, path)


def load_strongreject(root: Path) -> list[Record]:
    path = root / "strongreject_dataset.csv"
    rows = _rows_csv(path, ["forbidden_prompt"])
    return _checked(
        [Record(f"strongreject:{i}", r["forbidden_prompt"]) for i, r in enumerate(rows)], path
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
    path = root / "mt_bench_questions.jsonl"
    rows = _rows_jsonl(path, ["question_id", "turns"])
    return _checked([Record(f"mt_bench:{r['question_id']}", r["turns"][0]) for r in rows], path)


# name -> (loader, kind). The kind says how a benchmark is scored:
#   harmful: attack success = the answer does not refuse;  over_refusal: refusal of a safe prompt;
#   math: exact match of the final number;  usability: refusal of a benign instruction.
BENCHMARKS: dict[str, tuple[Callable[[Path], list[Record]], str]] = {
    "advbench": (load_advbench, "harmful"),
    "harmbench": (load_harmbench, "harmful"),
    "strongreject": (load_strongreject, "harmful"),
    "donotanswer": (load_donotanswer, "harmful"),
    "xstest_unsafe": (load_xstest_unsafe, "harmful"),
    "xstest_safe": (load_xstest_safe, "over_refusal"),
    "gsm8k": (load_gsm8k_test, "math"),
    "mt_bench": (load_mt_bench, "usability"),
}

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
    root: Path, benchmark: str, n: int, seed: int, n_probe_per_class: int
) -> pd.DataFrame:
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}'; allowed: {sorted(BENCHMARKS)}")
    loader, kind = BENCHMARKS[benchmark]
    recs = shuffled(loader(root), seed, benchmark)
    recs = take(recs, probe_slice_size(benchmark, n_probe_per_class), n, f"benchmark '{benchmark}'")
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "benchmark": benchmark,
            "kind": kind,
            "reference": [r.reference for r in recs],
        }
    )


# --- the demo base's safety-alignment set: slices from the TAIL of each shuffled source ---------
#
# The probe, evaluation and IFT sets take slices from the head of each shuffled source; the
# alignment set takes its slice from the tail, so switching alignment on changes no evaluation
# prompt, and `alignment_slice` refuses any request whose tail would reach into the head.

ALIGN_HARMFUL_SOURCES = tuple(name for name, (_, kind) in BENCHMARKS.items() if kind == "harmful")
ALIGN_BENIGN_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
}
# Safe look-alike prompts (no reference answers: the unaligned model answers them itself).
ALIGN_LOOKALIKE_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "xstest_safe": load_xstest_safe,
}


def head_slice_size(
    source: str, n_probe_per_class: int, eval_sizes: dict[str, int], ift_source: str, ift_n: int
) -> int:
    """Rows of a shuffled source that the probe set and then the evaluation or IFT set take."""
    after_probe = max(eval_sizes.get(source, 0), ift_n if source == ift_source else 0)
    return probe_slice_size(source, n_probe_per_class) + after_probe


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


def build_alignment_set(
    root: Path,
    harmful: dict[str, int],
    benign: dict[str, int],
    lookalike: dict[str, int],
    seed: int,
    n_probe_per_class: int,
    eval_sizes: dict[str, int],
    ift_source: str,
    ift_n: int,
) -> pd.DataFrame:
    """Prompts of the safety-alignment step, one row each, with their role:
    `refusal` (harmful: the response is filled in with a refusal), `benign` (with its reference
    answer), `lookalike` (a safe prompt that looks harmful, answered later by the model itself)."""
    rows = []
    for role, wanted, loaders in (
        ("refusal", harmful, {s: BENCHMARKS[s][0] for s in ALIGN_HARMFUL_SOURCES}),
        ("benign", benign, ALIGN_BENIGN_SOURCES),
        ("lookalike", lookalike, ALIGN_LOOKALIKE_SOURCES),
    ):
        for source, n in sorted(wanted.items()):
            if source not in loaders:
                raise DataError(
                    f"alignment {role} source '{source}' unknown; allowed: {sorted(loaders)}"
                )
            head = head_slice_size(source, n_probe_per_class, eval_sizes, ift_source, ift_n)
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
